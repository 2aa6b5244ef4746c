#!/usr/bin/env python3
"""Tool-call validity of a chat model served by `flashmoe serve` (issue 14), through the official
`openai` client with the chat client's own two tools (crates/chat/src/tools.rs).

Each prompt of --prompts (default testdata/chat/eval_prompts.json: requests about packages that
were held out of the chat model's training data, written by scripts/train/make_chat_data.py) is sent
once as a single user message, sampled with the model's generation_config.json defaults and
`seed` = its index. A reply counts as a VALID tool call when the server parsed it into at least one
tool call and every call names `bash` or `read_file` with arguments that are a JSON object holding
the required string (`command` / `path`) and nothing else. It counts as the EXPECTED call when the
first call is exactly the prompt's `expect`: a `bash` command line as the training data would
write it (`apt-cache show P`, `dpkg -L P`, `apt-cache search W`), or `read_file PATH`.

testdata/chat/novel_prompts.json holds 50 requests written by hand in phrasings the generator
never uses (popular packages, which are in the training data under the generator's phrasings).

    flashmoe serve --port 8011 &            # the built-in model
    python3 scripts/quality/chat_tools.py --url http://127.0.0.1:8011 [--out result.json]

--answer goes one step further for the `apt-cache show` / `apt-cache search` calls that are
exactly expected: it runs the command on this machine (only these read-only commands with one
plain word, never anything else the model wrote), sends the output back as the chat client does
(with its `[exit code N]` line), and checks that the answer is text (no further call) that names
the package and one of the versions the output lists (`apt-cache show`), or lists packages that
are all among those found (`apt-cache search`).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts", "train"))
from make_chat_data import TOOLS  # noqa: E402  (the client's schemas, copied from tools.rs)

REQUIRED = {"bash": "command", "read_file": "path"}


def expected_call(expect):
    """`read_file PATH` names a read_file call; anything else is a bash command line."""
    if expect.startswith("read_file "):
        return ("read_file", {"path": expect[len("read_file "):]})
    return ("bash", {"command": expect})


def check(calls):
    """(valid, first call's (name, args) or None)."""
    if not calls:
        return False, None
    first = None
    for c in calls:
        name = c.function.name
        try:
            args = json.loads(c.function.arguments)
        except (TypeError, ValueError):
            return False, first
        if first is None:
            first = (name, args)
        key = REQUIRED.get(name)
        if key is None or not isinstance(args, dict) or set(args) != {key} or not isinstance(args[key], str) \
                or not args[key].strip():
            return False, first
    return True, first


SAFE = re.compile(r"^apt-cache (show|search) [A-Za-z0-9][A-Za-z0-9.+-]*$")


def run_safe(command):
    """Output of a read-only apt-cache command, as the chat client's bash tool returns it."""
    assert SAFE.match(command), command
    p = subprocess.run(["bash", "-c", "exec 2>&1\n" + command], capture_output=True, text=True, timeout=60)
    out = p.stdout[:16384]
    if out and not out.endswith("\n"):
        out += "\n"
    return out + f"[exit code {p.returncode}]"


def answer_ok(command, output, answer):
    """The answer names what the output is about (and, for show, a version it lists)."""
    if not answer:
        return False
    word = command.split()[-1]
    if command.startswith("apt-cache show "):
        versions = re.findall(r"^Version: (\S+)$", output, re.M)
        return word in answer and any(v in answer for v in versions)
    hits = {line.split(" - ")[0] for line in output.splitlines() if " - " in line}
    named = re.findall(r"(?:: |; )([a-z0-9][a-z0-9.+-]+) \(", answer)
    return bool(named) and all(n in hits for n in named) if hits else word in answer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8011")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--prompts", default=os.path.join(ROOT, "testdata/chat/eval_prompts.json"))
    ap.add_argument("--n", type=int, default=0, help="first N prompts (default all)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--extra-body", default="{}", help="JSON merged into each request (e.g. sampling fields)")
    ap.add_argument("--answer", action="store_true",
                    help="run exactly expected apt-cache calls here and check the answer to their output")
    args = ap.parse_args()

    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=args.url + "/v1", api_key="none")
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    if args.n:
        prompts = prompts[:args.n]
    rows, valid, expected, t0 = [], 0, 0, time.time()
    answered, answers_ok = 0, 0
    for i, p in enumerate(prompts):
        r = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": p["prompt"]}],
                                           tools=TOOLS, seed=i, max_tokens=args.max_tokens,
                                           extra_body=json.loads(args.extra_body))
        ch = r.choices[0]
        ok, first = check(ch.message.tool_calls)
        exp = ok and first == expected_call(p["expect"])
        valid += ok
        expected += exp
        rows.append({"prompt": p["prompt"], "expect": p["expect"], "valid": ok, "expected": exp,
                     "finish_reason": ch.finish_reason, "content": ch.message.content,
                     "calls": [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]})
        mark = "ok " if exp else ("val" if ok else "BAD")
        got = rows[-1]["calls"] or (ch.message.content or "")[:100]
        print(f"{mark} {p['prompt']!r} -> {got}", flush=True)
        if args.answer and exp and SAFE.match(p["expect"]):
            call = ch.message.tool_calls[0]
            output = run_safe(p["expect"])
            msgs = [{"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": ch.message.content or "", "tool_calls": [
                        {"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                    {"role": "tool", "tool_call_id": call.id, "content": output}]
            answered += 1
            try:
                r2 = client.chat.completions.create(model=args.model, messages=msgs, tools=TOOLS, seed=i,
                                                    max_tokens=args.max_tokens,
                                                    extra_body=json.loads(args.extra_body))
            except BadRequestError as e:  # the output does not fit the context: a failure too
                rows[-1]["answer"], rows[-1]["answer_ok"] = f"(400: {e.message})", False
                print(f"    BAD answer: 400 {e.message[:120]}", flush=True)
                continue
            a = r2.choices[0].message
            good = not a.tool_calls and answer_ok(p["expect"], output, a.content)
            answers_ok += good
            rows[-1]["answer"] = a.content
            rows[-1]["answer_ok"] = good
            print(f"    {'ok ' if good else 'BAD'} answer: {(a.content or '')[:200]!r}", flush=True)
    n = len(prompts)
    summary = {"n": n, "valid": valid, "valid_rate": valid / n, "expected": expected, "expected_rate": expected / n,
               "seconds": round(time.time() - t0, 1)}
    if args.answer:
        summary.update({"answered": answered, "answers_ok": answers_ok})
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
