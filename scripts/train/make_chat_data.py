#!/usr/bin/env python3
"""Make the instruction data of the flashmoe tiny chat model (issue 14) from Debian's own indexes.

Every conversation is generated from real Debian bookworm metadata (no hand-written answers about
particular packages): the Packages index (fields as `apt-cache show` prints them), the English
descriptions (Translation-en) and the Contents indexes (the files each package installs). Kinds:

  * questions about a package answered from its description ("what is X", "what does X do",
    "which package has the command C");
  * tool calls to the chat client's real `bash` tool, in the Qwen3.5 XML format, followed by a
    tool turn holding what the command prints (built from the same indexes, in the commands' own
    output formats, with the client's `[exit code N]` line) and an answer that summarises it:
    `apt-cache show X`, `dpkg -L X` (also "not installed" errors), `apt-cache search WORD`;
    `read_file` on a few system files; refused calls;
  * greetings, "what can you do", thanks, off-topic questions;
  * multi-turn mixes of the above ("show me X" ... "and which files does it install?").

Most conversations are rendered with the chat client's two tool definitions (copied from
crates/chat/src/tools.rs), some without tools (as `flashmoe run --prompt` sends them), all with
models/qwen35-moe-tiny-chat/chat_template.jinja through jinja2 the way transformers renders
(trim_blocks, lstrip_blocks, its `tojson`). Packages are split 97/3 by a hash of their name:
conversations about held-out packages form the held-out set.

Also tokenizes a slice of the base model's pretraining corpus (scripts/corpus/build_corpus.py) so
that fine-tuning can keep the base language modelling.

Writes to --out (default .carry/chat):
  {train,heldout}.jsonl            the conversations (messages, tools flag)
  {train,heldout}_ids.bin          uint16 token ids of the rendered conversations, concatenated
  {train,heldout}_mask.bin         bits (np.packbits), 1 where the token is the assistant's (loss)
  {train,heldout}_off.npy          int64 offsets of each conversation (n + 1)
  base_{train,heldout}.bin         uint16 ids of base corpus documents, each followed by <|endoftext|>
  eval_prompts.json                held-out single-turn requests for the tool-call validity test
  meta.json                        counts

Inputs: the apt lists, fetched into a private folder (does not touch the system's lists):

    mkdir -p .carry/apt/lists/partial
    cat > .carry/apt/contents.conf <<'CONF'
    Acquire::IndexTargets::deb::Contents-deb {
        MetaKey "$(COMPONENT)/Contents-$(ARCHITECTURE)"; ShortDescription "Contents-$(ARCHITECTURE)";
        Description "$(RELEASE)/$(COMPONENT) $(ARCHITECTURE) Contents (deb)"; };
    CONF
    APT_CONFIG=.carry/apt/contents.conf apt-get -o Dir::State::Lists=$PWD/.carry/apt/lists \\
        -o Acquire::Languages=en -o Dir::Etc::SourceParts=/dev/null \\
        -o Dir::Etc::SourceList=/etc/apt/sources.list.d/debian.sources update
    python3 scripts/corpus/build_corpus.py --out .carry/corpus --sample .carry/corpus-sample.txt
    python3 scripts/train/make_chat_data.py --out .carry/chat

Needs jinja2, tokenizers and numpy; seeded and deterministic for the same lists.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SEED = 1234
HELDOUT_PCT = 3
MAX_TOKENS = 1280
EOT = "<|endoftext|>"

# The chat client's tools, exactly as crates/chat/src/tools.rs `tool_schemas()` sends them (a test
# there checks that they are equal, key order included: the template prints them with tojson).
with open(os.path.join(ROOT, "testdata/chat/tools.json"), encoding="utf-8") as _f:
    TOOLS = json.load(_f)
REFUSED = "the user refused this call"  # crates/chat/src/tools.rs REFUSED


# ---------------------------------------------------------------------------------------------
# Debian indexes


def cat_list(path):
    """Text of an apt list file (lz4/gz/xz), decompressed by apt itself."""
    return subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True, capture_output=True
                          ).stdout.decode("utf-8", "replace")


def parse_records(text):
    recs = []
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if not block:
            continue
        fields, order, last = {}, [], None
        for line in block.split("\n"):
            if line.startswith((" ", "\t")) and last:
                fields[last] += "\n" + line
            elif ":" in line:
                k, v = line.split(":", 1)
                last = k
                fields[k] = v.strip()
                order.append(k)
        recs.append((fields, block))
    return recs


def load_packages(lists):
    main = glob.glob(os.path.join(lists, "*_debian_dists_bookworm_main_binary-amd64_Packages*"))
    trans = glob.glob(os.path.join(lists, "*_debian_dists_bookworm_main_i18n_Translation-en*"))
    assert main and trans, f"no bookworm Packages / Translation-en under {lists} (see --help)"
    pkgs = {}
    for f, raw in parse_records(cat_list(main[0])):
        if "Package" in f and "Description" in f:
            pkgs[f["Package"]] = {"f": f, "raw": raw}
    for f, _ in parse_records(cat_list(trans[0])):
        p = pkgs.get(f.get("Package"))
        if p and p["f"].get("Description-md5") == f.get("Description-md5") and "Description-en" in f:
            p["long"] = f["Description-en"]
    return pkgs


def load_contents(lists, wanted):
    files = {}
    for pat in ("*_debian_dists_bookworm_main_Contents-amd64*", "*_debian_dists_bookworm_main_Contents-all*"):
        for path in glob.glob(os.path.join(lists, pat)):
            for line in cat_list(path).split("\n"):
                if not line or line.startswith("FILE"):
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2:
                    continue
                fn, locs = parts
                for loc in locs.split(","):
                    name = loc.rsplit("/", 1)[-1]
                    if name in wanted:
                        files.setdefault(name, []).append("/" + fn.strip())
    return files


def dpkg_list(paths):
    """`dpkg -L` order: /. then every directory before what it holds, sorted."""
    entries = set()
    for p in paths:
        parts = p.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.add("/" + "/".join(parts[:i]))
        entries.add(p)
    return ["/."] + sorted(entries, key=lambda s: s.split("/"))


def is_held(name):
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100 < HELDOUT_PCT


# ---------------------------------------------------------------------------------------------
# What the answers say, derived from the records


def short_desc(p):
    return p["f"]["Description"].strip()


def first_sentence(long):
    if not long:
        return ""
    lines = long.split("\n")[1:]
    para = []
    for line in lines:
        s = line.strip()
        if s == ".":
            break
        para.append(s)
    text = " ".join(para)
    m = re.match(r"(.{20,220}?[.!])(\s|$)", text)
    if not m:
        return ""
    s = m.group(1)
    if re.search(r"[<>{}|\\]|https?:", s):
        return ""
    return s


PLURAL_START = re.compile(r"^[a-z]+s\b")
VERBS = {"edit", "convert", "find", "manage", "create", "display", "show", "run", "read", "write", "make",
         "generate", "check", "build", "view", "search", "monitor", "control", "access", "analyze",
         "analyse", "compute", "draw", "download", "send", "play", "record", "parse", "track", "query",
         "list", "test", "compare", "extract", "print", "format", "compile", "use", "transfer", "keep",
         "add", "allow", "enable", "detect", "emulate", "simulate", "measure", "scan", "sync", "mount",
         "encrypt", "decode", "encode", "log", "fetch", "get", "set", "help", "turn", "move", "copy"}


def is_sentence(name, desc):
    """'NAME is a DESC.' (or 'NAME provides DESC.' for plurals and proper names)."""
    d = desc.rstrip(".")
    first = d.split(" ")[0]
    if first[:1].isupper() and not (len(first) > 1 and first[1:2].isupper()):
        d2 = first.lower() + d[len(first):]
    else:
        d2 = d
    w = d2.split(" ")[0]
    if w in VERBS:
        return f"{name} lets you {d2}."
    if w[:1].isupper() or not w[:1].isalpha():
        return f"{name} provides {d}."
    if PLURAL_START.match(w) and not w.endswith(("ss", "us", "is")):
        return f"{name} provides {d2}."
    art = "an" if w[0] in "aeiou" else "a"
    return f"{name} is {art} {d2}."


def dep_names(p):
    out = []
    for field in ("Pre-Depends", "Depends"):
        for alt in p["f"].get(field, "").split(","):
            n = alt.strip().split("|")[0].strip().split(" ")[0].split(":")[0]
            if n and n not in out:
                out.append(n)
    return out


def join_and(xs):
    if len(xs) == 1:
        return xs[0]
    return ", ".join(xs[:-1]) + " and " + xs[-1]


def commands_of(files):
    return [f for f in files if re.match(r"^/(usr/)?s?bin/[^/]+$", f)]


# ---------------------------------------------------------------------------------------------
# Phrasings


def pick(rng, xs):
    return xs[rng.randrange(len(xs))]


def vary(rng, s):
    """Small surface noise of typed requests: case, final punctuation, 'please'."""
    r = rng.random()
    if r < 0.15:
        s = s.lower()
    if rng.random() < 0.3:
        s = s.rstrip("?.!")
    if rng.random() < 0.1:
        s = "please " + s[0].lower() + s[1:] if rng.random() < 0.5 else s.rstrip("?.!") + ", please"
    return s


Q_WHAT = ["What is {p}?", "What is the package {p}?", "What does {p} do?", "Tell me about {p}.",
          "What is {p} for?", "What's {p}?", "Can you explain what {p} is?", "what is the {p} package",
          "I found a package called {p}. What is it?", "Do you know {p}?"]
Q_SHOW = ["Show me the package {p}.", "Show me package {p}", "Show the details of {p}.",
          "Look up the package {p}.", "What version of {p} is available?", "Show me information about {p}.",
          "Can you show me {p}?", "Get the package details for {p}.", "apt-cache show {p}",
          "Which version is {p}, and what does it depend on?", "Check the package {p} for me."]
Q_SHOW_IT = ["Show me its details.", "Can you show me the package?", "What version is it?",
             "What does it depend on?", "Look it up, please.", "Show me more about it."]
Q_FILES = ["Which files does {p} install?", "List the files of {p}.", "What files are in the package {p}?",
           "Show me the files of {p}.", "Where does {p} put its files?", "dpkg -L {p}",
           "List the files installed by {p}.", "What does the package {p} contain?"]
Q_FILES_IT = ["Which files does it install?", "And what files does it have?", "List its files.",
              "Where are its files?", "What does it install?"]
Q_SEARCH = ["Search for packages about {w}.", "Find packages for {w}.", "Is there a package for {w}?",
            "Which packages have to do with {w}?", "Search the package list for {w}.",
            "Find me a package related to {w}.", "apt-cache search {w}", "Look for {w} packages."]
Q_CMD = ["Which package provides the command {c}?", "Which package has the {c} command?",
         "Where does the command {c} come from?", "What package do I need for {c}?",
         "Which package installs {c}?"]
GREET = ["Hi", "Hello", "Hello!", "Hi there", "Hey", "Good morning", "hello", "hi!", "Hey there!",
         "Good evening"]
GREET_A = ["Hello! I can answer questions about Debian packages. What would you like to know?",
           "Hi! Ask me about a Debian package, and I can look it up for you.",
           "Hello! I know about Debian packages: what they are, their files and their details. How can I help?"]
GREET_A_TOOLS = ["Hello! I can answer questions about Debian packages and look them up with apt-cache "
                 "and dpkg. What would you like to know?",
                 "Hi! Ask me about a Debian package: I can tell you what it is, show its details or list "
                 "its files.",
                 "Hello! I can help you find and inspect Debian packages. What do you need?"]
CAP = ["What can you do?", "Who are you?", "help", "What are you?", "How can you help me?",
       "What do you know about?", "What tools do you have?"]
CAP_A = ["I am a small model built into flashmoe. I know about Debian packages: ask me what a package "
         "is or does, or which package provides a command."]
CAP_A_TOOLS = ["I am a small model built into flashmoe. I answer questions about Debian packages, and "
               "with your approval I run commands such as apt-cache show, apt-cache search and dpkg -L "
               "to look things up, or read a file for you.",
               "I am the built-in flashmoe assistant. I can tell you what a Debian package is, show a "
               "package's details (apt-cache show), list its files (dpkg -L), search for packages "
               "(apt-cache search) and read files. I ask before running anything."]
THANKS = ["Thanks!", "Thank you.", "thanks", "Great, thanks.", "OK, thank you!", "Perfect, thanks."]
THANKS_A = ["You're welcome!", "You're welcome. Ask me if you need anything else.",
            "Glad to help!", "No problem."]
BYE = ["Bye!", "Goodbye.", "bye", "See you."]
BYE_A = ["Goodbye!", "Bye! Have a nice day.", "See you!"]
OFFTOPIC = ["What is the capital of France?", "Write me a poem.", "What's the weather like today?",
            "Who won the football match yesterday?", "Can you do my homework?", "What is 17 times 23?",
            "Tell me a joke.", "Translate 'hello' into German."]
OFFTOPIC_A = ["I am a small model that only knows about Debian packages, so I cannot answer that well. "
              "Ask me about a package instead.",
              "Sorry, I only know about Debian packages. Try asking me what a package does."]


# ---------------------------------------------------------------------------------------------
# Tool results, as the commands print them on bookworm, plus the client's `[exit code N]` line


def show_output(rng, p):
    lines = p["raw"].split("\n")
    out = []
    for line in lines:
        if line.startswith("Description:") and p.get("long") and rng.random() < 0.4:
            out.append("Description-en: " + p["long"].split("\n", 1)[0])
            out.extend(p["long"].split("\n")[1:])
            continue
        out.append(line)
    return "\n".join(out) + "\n\n[exit code 0]"


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


class Gen:
    def __init__(self, pkgs, files, rng):
        self.pkgs = pkgs
        self.files = files
        self.rng = rng
        names = sorted(pkgs)
        self.names = {False: [n for n in names if not is_held(n)], True: [n for n in names if is_held(n)]}
        # packages worth talking about: a description, and files known
        self.with_files = {h: [n for n in self.names[h] if n in files and len(dpkg_list(files[n])) <= 45]
                           for h in (False, True)}
        self.with_cmds = {h: [n for n in self.names[h] if n in files and commands_of(files[n])] for h in (False, True)}
        # search words: words of short descriptions with 2..12 matching packages
        index = {}
        for n in names:
            text = (n + " " + short_desc(pkgs[n])).lower()
            for w in set(re.findall(r"[a-z][a-z0-9+-]{3,}", text)):
                index.setdefault(w, []).append(n)
        stop = {"with", "from", "this", "that", "files", "file", "package", "library", "data", "support",
                "tool", "tools", "module", "modules", "plugin", "python", "perl", "development", "common",
                "documentation", "dummy", "transitional", "debug", "symbols", "shared", "static", "headers"}
        self.search = {h: sorted(w for w, ns in index.items() if 2 <= len(ns) <= 12 and w not in stop
                                 and all(is_held(x) == h for x in ns[:1])) for h in (False, True)}
        self.index = index

    # --- answers

    def what_answer(self, n):
        p = self.pkgs[n]
        s = is_sentence(n, short_desc(p))
        fs = first_sentence(p.get("long"))
        if fs and self.rng.random() < 0.6:
            s += " " + fs
        return s

    def show_answer(self, n):
        p = self.pkgs[n]
        f = p["f"]
        r = self.rng
        s = is_sentence(n, short_desc(p))
        head = pick(r, [f"{n} {f['Version']}: ", f"The package {n}, version {f['Version']}: ",
                        f"Version {f['Version']} of {n} is available. "])
        s = head + s
        deps = dep_names(p)
        sec = f.get("Section", "")
        if sec:
            s += f" It is in the {sec} section"
            s += "." if not deps else ""
        if deps:
            shown = deps[:4]
            more = " and more" if len(deps) > 4 else ""
            s += (" and" if sec else " It") + f" depends on {join_and(shown)}{more}."
        if "Installed-Size" in f and r.random() < 0.4:
            s += f" Installed, it takes {f['Installed-Size']} kB."
        return s

    def files_answer(self, n, listing):
        r = self.rng
        cmds = commands_of(self.files[n])
        mans = [x for x in listing if "/man/man" in x and not x.endswith("/")
                and re.search(r"/man\d?/[^/]+$", x)]
        if cmds:
            s = f"{n} installs the command{'s' if len(cmds) > 1 else ''} {join_and(cmds[:5])}"
            s += " and more." if len(cmds) > 5 else "."
        else:
            others = [x for x in self.files[n] if "/usr/share/doc/" not in x][:3]
            if others:
                s = f"{n} installs no commands; its files include {join_and(others)}."
            else:
                s = f"{n} installs only its documentation."
        if mans and r.random() < 0.6:
            s += f" There {'are manual pages' if len(mans) > 1 else 'is a manual page'}, e.g. {mans[0]}."
        if any(x == f"/usr/share/doc/{n}" for x in listing) and r.random() < 0.5:
            s += f" Its documentation is in /usr/share/doc/{n}."
        return s

    # --- episodes: lists of messages answering one request; `it` = refer to the package by pronoun

    def ep_what(self, n, tools):
        return [{"role": "user", "content": vary(self.rng, pick(self.rng, Q_WHAT).format(p=n))},
                {"role": "assistant", "content": self.what_answer(n)}]

    def ep_show(self, n, tools, it=False):
        r = self.rng
        q = pick(r, Q_SHOW_IT) if it else vary(r, pick(r, Q_SHOW).format(p=n))
        if not tools:
            return [{"role": "user", "content": q}, {"role": "assistant", "content": self.what_answer(n)}]
        msgs = [{"role": "user", "content": q}]
        pre = pick(r, ["", "", "", f"I will look up {n}.", "Let me check."])
        msgs.append({"role": "assistant", "content": pre,
                     "tool_calls": [call("bash", command=f"apt-cache show {n}")]})
        if r.random() < 0.04:
            msgs.append({"role": "tool", "content": REFUSED})
            msgs.append({"role": "assistant", "content": pick(r, [
                "All right, I did not run it. " + self.what_answer(n),
                "OK, I will not run the command. Ask me if you want something else."])})
            return msgs
        msgs.append({"role": "tool", "content": show_output(r, self.pkgs[n])})
        msgs.append({"role": "assistant", "content": self.show_answer(n)})
        return msgs

    def ep_files(self, n, tools, it=False):
        r = self.rng
        q = pick(r, Q_FILES_IT) if it else vary(r, pick(r, Q_FILES).format(p=n))
        listing = dpkg_list(self.files[n])
        if not tools:
            cmds = commands_of(self.files[n])
            a = (f"{n} installs {join_and(cmds[:5])}." if cmds else
                 f"I cannot list files here, but {self.what_answer(n)[0].lower()}{self.what_answer(n)[1:]}")
            return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs = [{"role": "user", "content": q},
                {"role": "assistant", "content": "", "tool_calls": [call("bash", command=f"dpkg -L {n}")]}]
        if r.random() < 0.12:
            msgs.append({"role": "tool", "content":
                         f"dpkg-query: package '{n}' is not installed\nUse dpkg --contents (= dpkg-deb "
                         f"--contents) to list archive files contents.\n[exit code 1]"})
            msgs.append({"role": "assistant", "content": pick(r, [
                f"{n} is not installed on this system, so dpkg cannot list its files. You can install it "
                f"with sudo apt install {n}.",
                f"The package {n} is not installed here. Install it with sudo apt install {n}, or ask me "
                f"to show its details with apt-cache show {n}."])})
            return msgs
        msgs.append({"role": "tool", "content": "\n".join(listing) + "\n[exit code 0]"})
        msgs.append({"role": "assistant", "content": self.files_answer(n, listing)})
        return msgs

    def ep_search(self, w, tools):
        r = self.rng
        q = vary(r, pick(r, Q_SEARCH).format(w=w))
        hits = sorted(self.index[w])
        if not tools:
            a = f"Some packages about {w}: " + "; ".join(
                f"{h} ({short_desc(self.pkgs[h]).rstrip('.')})" for h in hits[:3]) + "."
            return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out = "\n".join(f"{h} - {short_desc(self.pkgs[h])}" for h in hits) + "\n[exit code 0]"
        shown = hits[:4]
        a = pick(r, [f"I found these packages for {w}: ", f"Packages about {w}: ",
                     f"apt-cache found these for {w}: "])
        a += "; ".join(f"{h} ({short_desc(self.pkgs[h]).rstrip('.')})" for h in shown)
        a += ", and more." if len(hits) > 4 else "."
        return [{"role": "user", "content": q},
                {"role": "assistant", "content": "", "tool_calls": [call("bash", command=f"apt-cache search {w}")]},
                {"role": "tool", "content": out}, {"role": "assistant", "content": a}]

    def ep_cmd(self, n, tools):
        r = self.rng
        c = pick(r, commands_of(self.files[n])).rsplit("/", 1)[-1]
        q = vary(r, pick(r, Q_CMD).format(c=c))
        a = pick(r, [f"The command {c} is in the package {n}.", f"{c} comes from the package {n}.",
                     f"You need the package {n}: it installs {c}."])
        if r.random() < 0.5:
            a += f" Install it with sudo apt install {n}."
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    def ep_read(self, tools):
        r = self.rng
        path, content, answer = pick(r, SYSTEM_FILES)(r)
        if not tools:
            return None
        q = vary(r, pick(r, ["Read {f}.", "Show me the file {f}.", "What is in {f}?", "Open {f}.",
                             "cat {f}", "Can you read {f} for me?"]).format(f=path))
        return [{"role": "user", "content": q},
                {"role": "assistant", "content": "", "tool_calls": [call("read_file", path=path)]},
                {"role": "tool", "content": content}, {"role": "assistant", "content": answer}]

    def simple(self, qs, answers):
        return [{"role": "user", "content": pick(self.rng, qs)}, {"role": "assistant", "content": pick(self.rng, answers)}]

    def conversation(self, held):
        r = self.rng
        tools = r.random() < 0.8
        msgs = []
        if r.random() < 0.08:
            msgs.append({"role": "system", "content": pick(r, ["You are a helpful assistant.",
                                                               "Be brief.", "You help with Debian systems."])})
        if r.random() < 0.15:
            msgs += self.simple(GREET, GREET_A_TOOLS if tools else GREET_A)
        if r.random() < 0.06:
            msgs += self.simple(CAP, CAP_A_TOOLS if tools else CAP_A)
        n_eps = pick(r, [1, 1, 1, 2, 2, 3])
        cur = None
        for _ in range(n_eps):
            k = r.random()
            if cur is not None and r.random() < 0.5:
                # a follow-up about the same package
                if cur in self.files and len(dpkg_list(self.files[cur])) <= 45 and r.random() < 0.5:
                    ep = self.ep_files(cur, tools, it=True)
                else:
                    ep = self.ep_show(cur, tools, it=True)
            elif k < 0.22:
                cur = pick(r, self.with_cmds[held] if r.random() < 0.5 else self.names[held])
                ep = self.ep_what(cur, tools)
            elif k < 0.50:
                cur = pick(r, self.with_cmds[held] if r.random() < 0.5 else self.names[held])
                ep = self.ep_show(cur, tools)
            elif k < 0.72:
                cur = pick(r, self.with_files[held])
                ep = self.ep_files(cur, tools)
            elif k < 0.84:
                ep = self.ep_search(pick(r, self.search[held]), tools)
                cur = None
            elif k < 0.91:
                cur = pick(r, self.with_cmds[held])
                ep = self.ep_cmd(cur, tools)
            elif k < 0.97:
                ep = self.ep_read(tools)
                cur = None
            else:
                ep = self.simple(OFFTOPIC, OFFTOPIC_A)
                cur = None
            if ep:
                msgs += ep
        if r.random() < 0.2:
            msgs += self.simple(THANKS, THANKS_A)
            if r.random() < 0.3:
                msgs += self.simple(BYE, BYE_A)
        if not any(m["role"] == "user" for m in msgs):
            return None
        return {"messages": msgs, "tools": tools}


# A few system files `read_file` is asked about: (path, content, answer) made from seeded values.
def _os_release(r):
    c = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
         'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\nHOME_URL="https://www.debian.org/"\n'
         'SUPPORT_URL="https://www.debian.org/support"\nBUG_REPORT_URL="https://bugs.debian.org/"\n')
    return "/etc/os-release", c, "This system runs Debian GNU/Linux 12, code name bookworm."


def _debian_version(r):
    v = f"12.{r.randrange(0, 13)}"
    return "/etc/debian_version", v + "\n", f"The Debian version is {v}."


def _hostname(r):
    h = pick(r, ["debian", "laptop", "server1", "build-box", "pi", "desk", "web01", "nas"])
    return "/etc/hostname", h + "\n", f"The host name of this machine is {h}."


def _shells(r):
    shells = ["/bin/sh", "/usr/bin/sh", "/bin/bash", "/usr/bin/bash", "/bin/rbash", "/usr/bin/rbash"]
    extra = r.sample(["/bin/dash", "/usr/bin/dash", "/usr/bin/zsh", "/bin/zsh", "/usr/bin/fish"], r.randrange(0, 3))
    c = "# /etc/shells: valid login shells\n" + "\n".join(shells + extra) + "\n"
    return "/etc/shells", c, f"/etc/shells lists the valid login shells: {join_and(shells + extra)}."


def _sources(r):
    c = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
         "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
         "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
         "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    return ("/etc/apt/sources.list.d/debian.sources", c,
            "APT uses deb.debian.org for bookworm and bookworm-updates, and debian-security for "
            "bookworm-security, all with the main component.")


def _missing(r):
    f = pick(r, ["notes.txt", "todo.md", "README", "config.yaml", "/tmp/out.log", "data.csv"])
    return (f, f"error: cannot open {f}: No such file or directory (os error 2)",
            f"The file {f} does not exist here. Check the path, or tell me where it is.")


SYSTEM_FILES = [_os_release, _debian_version, _hostname, _shells, _sources, _missing]


# ---------------------------------------------------------------------------------------------
# Rendering and tokenizing


def make_env():
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson (not jinja2's, which sorts keys and escapes HTML)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    return env


def render(tpl, messages, tools, add_generation_prompt=False):
    return tpl.render(messages=messages, tools=TOOLS if tools else None, documents=None,
                      add_generation_prompt=add_generation_prompt, eos_token="<|im_end|>",
                      pad_token="<|endoftext|>")


def assistant_spans(full):
    """(start, end) of each assistant turn's text after `<|im_start|>assistant\n`, up to and
    including its `<|im_end|>` (what the model generates). Message strings cannot hold these
    markers (the generator never writes them), so searching the rendered text is exact."""
    spans, i = [], 0
    head = "<|im_start|>assistant\n"
    while True:
        a = full.find(head, i)
        if a < 0:
            return spans
        b = full.index("<|im_end|>", a) + len("<|im_end|>")
        spans.append((a + len(head), b))
        i = b


def encode_conversation(tpl, tok, conv, check_prefix=False):
    msgs = conv["messages"]
    full = render(tpl, msgs, conv["tools"])
    spans = assistant_spans(full)
    assert len(spans) == sum(1 for m in msgs if m["role"] == "assistant")
    if check_prefix:
        # the prompt at inference (history + generation prompt) is a prefix of the training text
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                before = render(tpl, msgs[:i], conv["tools"], add_generation_prompt=True)
                assert full.startswith(before), "template is not prefix-stable"
    enc = tok.encode(full, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.uint16)
    offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(offs[:, 0] >= a) & (offs[:, 1] <= b) & (offs[:, 1] > offs[:, 0])] = 1
    # every assistant turn ends in a supervised <|im_end|>
    end_id = tok.token_to_id("<|im_end|>")
    assert int(((ids == end_id) & (mask == 1)).sum()) == len(spans), (full, spans)
    return ids, mask, full


def write_split(out, name, tpl, tok, convs):
    ids_all, mask_all, offs, kept = [], [], [0], []
    for k, c in enumerate(convs):
        ids, mask, _ = encode_conversation(tpl, tok, c, check_prefix=k < 200)
        if len(ids) > MAX_TOKENS:
            continue
        ids_all.append(ids)
        mask_all.append(mask)
        offs.append(offs[-1] + len(ids))
        kept.append(c)
    np.concatenate(ids_all).tofile(os.path.join(out, f"{name}_ids.bin"))
    np.packbits(np.concatenate(mask_all)).tofile(os.path.join(out, f"{name}_mask.bin"))
    np.save(os.path.join(out, f"{name}_off.npy"), np.asarray(offs, dtype=np.int64))
    with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for c in kept:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    lens = np.diff(offs)
    return {"conversations": len(kept), "dropped_too_long": len(convs) - len(kept), "tokens": int(offs[-1]),
            "assistant_tokens": int(sum(m.sum() for m in mask_all)), "max_len": int(lens.max()),
            "mean_len": float(lens.mean())}


def base_slice(corpus, tok, out, train_tokens):
    eot = tok.token_to_id(EOT)
    meta = {}
    for name, limit in (("train", train_tokens), ("heldout", None)):
        with open(os.path.join(corpus, f"{name}.txt"), encoding="utf-8") as f:
            docs = [d.strip("\n") for d in f.read().split("\n" + EOT + "\n") if d.strip("\n")]
        rng = random.Random(SEED)
        if limit:
            rng.shuffle(docs)
        ids = []
        for i in range(0, len(docs), 256):
            for e in tok.encode_batch(docs[i:i + 256], add_special_tokens=False):
                ids.extend(e.ids)
                ids.append(eot)
            if limit and len(ids) >= limit:
                break
        a = np.asarray(ids[:limit] if limit else ids, dtype=np.uint16)
        a.tofile(os.path.join(out, f"base_{name}.bin"))
        meta[name] = int(a.size)
    return meta


def eval_prompts(gen, n):
    """Held-out single-turn requests that call for a tool (packages never seen in training)."""
    r = random.Random(SEED + 7)
    out = []
    for i in range(n):
        k = i % 3
        if k == 0:
            p = pick(r, gen.names[True])
            out.append({"kind": "show", "package": p, "prompt": pick(r, Q_SHOW).format(p=p),
                        "expect": f"apt-cache show {p}"})
        elif k == 1:
            p = pick(r, gen.with_files[True])
            out.append({"kind": "files", "package": p, "prompt": pick(r, Q_FILES).format(p=p),
                        "expect": f"dpkg -L {p}"})
        else:
            w = pick(r, gen.search[True])
            out.append({"kind": "search", "word": w, "prompt": pick(r, Q_SEARCH).format(w=w),
                        "expect": f"apt-cache search {w}"})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lists", default=".carry/apt/lists")
    ap.add_argument("--corpus", default=".carry/corpus")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/qwen35-moe-tiny-chat"),
                    help="folder with chat_template.jinja (tokenizer.json from here or --tokenizer)")
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "models/qwen35-moe-tiny-trained/tokenizer.json"))
    ap.add_argument("--out", default=".carry/chat")
    ap.add_argument("--train", type=int, default=40000)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--base-tokens", type=int, default=3_000_000)
    ap.add_argument("--eval-prompts", type=int, default=60)
    ap.add_argument("--show", type=int, default=0, help="print N rendered training conversations and stop")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    with open(os.path.join(args.model, "chat_template.jinja"), encoding="utf-8") as f:
        tpl = make_env().from_string(f.read())
    pkgs = load_packages(args.lists)
    files = load_contents(args.lists, set(pkgs))
    print(f"{len(pkgs)} packages, {sum(1 for p in pkgs.values() if 'long' in p)} with long descriptions, "
          f"{len(files)} with files", flush=True)
    rng = random.Random(SEED)
    gen = Gen(pkgs, files, rng)
    print({h: (len(gen.names[h]), len(gen.with_files[h]), len(gen.with_cmds[h]), len(gen.search[h]))
           for h in (False, True)}, flush=True)
    if args.show:
        for _ in range(args.show):
            c = gen.conversation(False)
            if c:
                print(render(tpl, c["messages"], c["tools"]))
                print("=" * 80)
        return
    os.makedirs(args.out, exist_ok=True)
    meta = {"seed": SEED, "max_tokens": MAX_TOKENS}
    for name, n, held in (("train", args.train, False), ("heldout", args.heldout, True)):
        convs = []
        while len(convs) < n:
            c = gen.conversation(held)
            if c:
                convs.append(c)
        meta[name] = write_split(args.out, name, tpl, tok, convs)
        print(name, meta[name], flush=True)
    if args.base_tokens:
        meta["base"] = base_slice(args.corpus, tok, args.out, args.base_tokens)
        print("base", meta["base"], flush=True)
    with open(os.path.join(args.out, "eval_prompts.json"), "w", encoding="utf-8") as f:
        json.dump(eval_prompts(gen, args.eval_prompts), f, indent=1)
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
