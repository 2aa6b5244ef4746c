#!/usr/bin/env python3
"""Build the English training corpus for the flashmoe tiny trained model (issue 6).

Sources: English documentation and dictionaries packaged in Debian main (all DFSG-free; each
package's /usr/share/doc/PKG/copyright states its licence, and a copy of each is kept next to the
output as LICENSES.txt):

  python3.11-doc        Python 3.11 documentation (HTML; PSF licence and permissive notices)
  debian-reference-en   Debian Reference (HTML; GPL-2+)
  debian-handbook       The Debian Administrator's Handbook, en-US only (HTML; GPL-2+ / CC-BY-SA-3.0)
  debian-policy         Debian Policy Manual (HTML; GPL-2+)
  developers-reference  Debian Developer's Reference (HTML; GPL-2)
  maint-guide           Debian New Maintainers' Guide, English (HTML; GPL-2+ / MIT)
  gnu-standards         GNU Coding Standards / Information for Maintainers (HTML; GFDL-1.3+)
  bash-doc              Bash Reference Manual (HTML; GPL-3+ per the Debian copyright file)
  dict-gcide            Collaborative International Dictionary of English (Webster 1913 + WordNet; GPL-2+),
                        a deterministic random subset of GCIDE_MAX_MB of its entries
  dict-jargon           The Jargon File (GPL-2+ / public domain)
  dict-foldoc           Free On-line Dictionary of Computing (GFDL-1.1+)
  dict-devil            Ambrose Bierce, The Devil's Dictionary (public domain)
  fortunes              fortune-mod data, non-offensive set (BSD; files ethnic, men-women, ascii-art,
                        zippy skipped)

Pipeline: `apt-get download` each package (run `apt-get update` first if it fails), `dpkg -x` into a
temporary folder, extract plain text (stdlib html.parser for HTML, skipping navigation, <pre> code
blocks, scripts and styles; dictd .dict.dz entries sliced via their .index), normalise whitespace,
drop code-heavy / non-English paragraphs, deduplicate paragraphs and documents, cut into documents of
at most ~6000 characters, shuffle documents with a fixed seed and split 98/2 into train/held-out.
Documents are separated by a line holding only DOC_SEP in the output files.

Usage (on the developer machine, needs apt-get and dpkg, no pip packages):

    python3 scripts/corpus/build_corpus.py --out .carry/corpus \
        --sample testdata/trained/heldout-sample.txt
"""

import argparse
import gzip
import hashlib
import html
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from html.parser import HTMLParser

SEED = 1234
DOC_SEP = "<|endoftext|>"
MAX_DOC_CHARS = 6000
HELDOUT_FRACTION = 0.02
GCIDE_MAX_MB = 16.0  # the dictionary would otherwise be ~60% of the corpus

PACKAGES = [
    "python3.11-doc", "debian-reference-en", "debian-handbook", "debian-policy",
    "developers-reference", "maint-guide", "gnu-standards", "bash-doc", "dict-gcide",
    "dict-jargon", "dict-foldoc", "dict-devil", "fortunes",
]

FORTUNE_SKIP = {"ethnic", "men-women", "ascii-art", "zippy"}

SKIP_TAGS = {"script", "style", "pre", "nav", "head", "title", "form", "svg", "button", "noscript",
             "textarea", "select", "code-block"}
SKIP_CLASSES = {"sphinxsidebar", "sphinxsidebarwrapper", "related", "footer", "navheader",
                "navfooter", "toc", "mobile-nav", "menu-wrapper", "highlight", "breadcrumbs",
                "headerlink", "literallayout", "programlisting", "screen", "synopsis", "cmdsynopsis",
                "funcsynopsis", "sig", "sig-object", "doctest", "copyright", "legalnotice",
                "footnotes", "docutils field-list", "index", "indexterm", "version_switcher_placeholder",
                "language_switcher_placeholder", "sidebar", "search"}
BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "dd", "dt", "dl",
              "td", "th", "tr", "table", "br", "blockquote", "section", "article", "hr", "caption",
              "figure", "figcaption", "body", "main", "header", "aside"}
VOID_TAGS = {"br", "img", "input", "meta", "link", "hr", "area", "base", "col", "embed", "source",
             "track", "wbr", "param"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class TextExtractor(HTMLParser):
    """Plain text blocks from HTML, skipping navigation, code blocks and markup-only parts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks = []
        self.cur = []
        self.skip = []  # stack of open tag names while inside a skipped element

    def _flush(self):
        if self.cur:
            t = "".join(self.cur)
            self.cur = []
            t = " ".join(t.split())
            if t:
                self.blocks.append(t)

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if not self.skip and tag in BLOCK_TAGS:
                self._flush()
            return
        if self.skip:
            self.skip.append(tag)
            return
        cls = dict(attrs).get("class") or ""
        classes = set(cls.split())
        if tag in SKIP_TAGS or classes & SKIP_CLASSES or any(c.startswith("highlight") for c in classes) \
                or dict(attrs).get("role") in ("navigation", "search"):
            self._flush()
            self.skip.append(tag)
            return
        if tag in BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        if self.skip:
            if tag in self.skip:
                while self.skip:
                    if self.skip.pop() == tag:
                        break
            return
        if tag in BLOCK_TAGS:
            self._flush()

    def handle_data(self, data):
        if not self.skip:
            self.cur.append(data)

    def close(self):
        super().close()
        self._flush()


def html_blocks(path):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        src = f.read()
    p = TextExtractor()
    p.feed(src)
    p.close()
    return p.blocks


WORD_RE = re.compile(r"^[(\"'\[]*[A-Za-z][a-z]*(?:['\u2019-][A-Za-z]+)*[)\]\"'.,;:!?\u2019]*$")


def good_paragraph(t, min_words=4):
    """English prose filter: enough plain words, few code-like tokens, little non-ASCII."""
    toks = t.split()
    if len(toks) < min_words:
        return False
    plain = sum(1 for w in toks if WORD_RE.match(w))
    if plain / len(toks) < 0.6:
        return False
    non_ascii = sum(1 for c in t if ord(c) > 127 and c.isalpha())
    letters = sum(1 for c in t if c.isalpha())
    if letters == 0 or non_ascii / letters > 0.05:
        return False
    return True


def normalise(t):
    t = unicodedata.normalize("NFC", t)
    t = t.replace("\u00a0", " ").replace("\u00b6", "").replace("\u200b", "")
    t = re.sub(r"[ \t]+", " ", t)
    return t.strip()


def chunk_docs(paragraphs, max_chars=MAX_DOC_CHARS):
    """Group consecutive paragraphs into documents of at most max_chars (one paragraph may exceed)."""
    docs, cur, n = [], [], 0
    for p in paragraphs:
        if cur and n + len(p) > max_chars:
            docs.append("\n".join(cur))
            cur, n = [], 0
        cur.append(p)
        n += len(p) + 1
    if cur:
        docs.append("\n".join(cur))
    return docs


# ------------------------------------------------------------------------------------------------
# Sources


def html_files(root, pattern, exclude=()):
    out = []
    rx = re.compile(pattern)
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            if rx.search(p) and not any(e in p for e in exclude):
                out.append(p)
    return sorted(out)


def from_html(files, min_words=4):
    docs = []
    for p in files:
        paras = [normalise(b) for b in html_blocks(p)]
        paras = [b for b in paras if good_paragraph(b, min_words)]
        docs.extend(chunk_docs(paras))
    return docs


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64num(s):
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def dictd_entries(index_path, dict_path):
    data = gzip.open(dict_path, "rb").read()
    seen, entries = set(), []
    with open(index_path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            off, ln = b64num(parts[1]), b64num(parts[2])
            if off in seen:
                continue
            seen.add(off)
            entries.append((off, data[off:off + ln].decode("utf-8", errors="replace")))
    entries.sort()
    return [e for _, e in entries]


def clean_dict_entry(e, kind):
    lines = e.split("\n")
    out = []
    for ln in lines:
        s = ln.strip()
        if not s:
            out.append("")
            continue
        if kind == "gcide":
            if re.fullmatch(r"\[[^\]]*(Webster|WordNet|PJC|Century|Chambers)[^\]]*\]", s):
                continue
            s = re.sub(r"\\[^\\\n]{0,80}\\", "", s)  # pronunciation \Ab*do"men\
            s = re.sub(r"\[[^\]]*(Webster|WordNet|PJC|Narrower terms|Also See)[^\]]*\]", "", s)
            s = re.sub(r"\[(['`^\"]?)([A-Za-z])\]", r"\2", s)  # accent markup fr['i]jol -> frijol
        s = s.replace("{", "").replace("}", "")
        s = re.sub(r"\s+", " ", s).strip()
        s = re.sub(r" +([,;.])", r"\1", s)
        out.append(s)
    # re-flow: lines within a paragraph are joined by spaces; blank lines separate paragraphs
    paras, cur = [], []
    for s in out:
        if not s:
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    paras = [normalise(p) for p in paras if p]
    return "\n".join(p for p in paras if p)


def from_dictd(root, name, group=16, min_words=3):
    idx = os.path.join(root, "usr/share/dictd", name + ".index")
    dz = os.path.join(root, "usr/share/dictd", name + ".dict.dz")
    ents = [clean_dict_entry(e, name) for e in dictd_entries(idx, dz)]
    ents = [e for e in ents if len(e.split()) >= min_words]
    # consecutive entries form one document (alphabetical neighbours), capped in size
    docs = []
    for i in range(0, len(ents), group):
        docs.extend(chunk_docs(ents[i:i + group]))
    return docs


def from_fortunes(root):
    d = os.path.join(root, "usr/share/games/fortunes")
    fortunes = []
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".dat") or fn.endswith(".u8") or fn in FORTUNE_SKIP or os.path.islink(os.path.join(d, fn)):
            continue
        with open(os.path.join(d, fn), "r", encoding="utf-8", errors="replace") as f:
            parts = re.split(r"\n%\n", f.read())
        for p in parts:
            p = "\n".join(normalise(x) for x in p.strip("%\n").split("\n"))
            p = p.strip()
            if len(p.split()) >= 4 and good_paragraph(" ".join(p.split()), 4):
                fortunes.append(p)
    return chunk_docs(fortunes, 3000)


def collect(root):
    """Returns {source name: [documents]} from the unpacked packages under root/PKG/."""
    P = lambda *a: os.path.join(root, *a)  # noqa: E731
    src = {}
    src["python3.11-doc"] = from_html(html_files(
        P("python3.11-doc"), r"\.html$",
        exclude=("/genindex", "py-modindex", "/search.html", "/contents.html", "/changelog.html",
                 "/_static/", "/license.html", "/copyright.html", "/download.html")))
    src["debian-reference-en"] = from_html(html_files(P("debian-reference-en"), r"\.en\.html$"))
    src["debian-handbook"] = from_html(html_files(P("debian-handbook"), r"/html/en-US/.*\.html$"))
    src["debian-policy"] = from_html(html_files(P("debian-policy"), r"\.html$",
                                                exclude=("genindex", "search.html", "_static")))
    src["developers-reference"] = from_html(html_files(
        P("developers-reference"), r"developers-reference/[^/]+\.html$",
        exclude=("genindex", "search.html", "developers-reference.html")))
    src["maint-guide"] = from_html(html_files(P("maint-guide"), r"\.en\.html$"))
    src["gnu-standards"] = from_html(html_files(P("gnu-standards"), r"\.html$"))
    src["bash-doc"] = from_html(html_files(P("bash-doc"), r"/bashref\.html$"))
    src["dict-gcide"] = from_dictd(P("dict-gcide"), "gcide")
    src["dict-jargon"] = from_dictd(P("dict-jargon"), "jargon", group=8)
    src["dict-foldoc"] = from_dictd(P("dict-foldoc"), "foldoc", group=8)
    src["dict-devil"] = from_dictd(P("dict-devil"), "devil", group=8)
    src["fortunes"] = from_fortunes(P("fortunes"))
    return src


def dedup(src):
    """Drop repeated paragraphs (navigation, boilerplate) corpus-wide, then repeated documents."""
    seen_p, seen_d = set(), set()
    out, dropped_p = {}, 0
    for name in PACKAGES:
        docs = []
        for d in src.get(name, []):
            keep = []
            for p in d.split("\n"):
                if len(p) >= 40:
                    h = hashlib.sha1(p.lower().encode()).digest()
                    if h in seen_p:
                        dropped_p += 1
                        continue
                    seen_p.add(h)
                keep.append(p)
            if not keep:
                continue
            doc = "\n".join(keep)
            if len(doc) < 100:
                continue
            h = hashlib.sha1(doc.encode()).digest()
            if h in seen_d:
                continue
            seen_d.add(h)
            docs.append(doc)
        out[name] = docs
    return out, dropped_p


def fetch(pkgs, debdir, rootdir):
    os.makedirs(debdir, exist_ok=True)
    os.makedirs(rootdir, exist_ok=True)  # dpkg -x creates only the last path component
    for p in pkgs:
        if not any(f.startswith(p + "_") for f in os.listdir(debdir)):
            r = subprocess.run(["apt-get", "download", p], cwd=debdir, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"apt-get download {p} failed (run `apt-get update` first?): {r.stderr}")
    versions = {}
    for f in sorted(os.listdir(debdir)):
        if not f.endswith(".deb"):
            continue
        name, ver = f.split("_")[0], f.split("_")[1]
        if name not in pkgs:
            continue
        versions[name] = ver.replace("%3a", ":")
        dest = os.path.join(rootdir, name)
        if not os.path.isdir(dest):
            subprocess.run(["dpkg", "-x", os.path.join(debdir, f), dest], check=True)
    return versions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".carry/corpus")
    ap.add_argument("--sample", default="testdata/trained/heldout-sample.txt")
    ap.add_argument("--sample-bytes", type=int, default=150_000)
    ap.add_argument("--work", default=None, help="keep downloads/unpacked files here (default: temp)")
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="flashmoe-corpus-")
    versions = fetch(PACKAGES, os.path.join(work, "debs"), os.path.join(work, "root"))
    log("packages: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    src = collect(os.path.join(work, "root"))
    src, dropped = dedup(src)
    log(f"dropped {dropped} repeated paragraphs")

    rng = random.Random(SEED)
    g = src["dict-gcide"]
    keep = sorted(rng.sample(range(len(g)), len(g)))
    out, n = [], 0
    for i in keep:
        if n >= GCIDE_MAX_MB * 1e6:
            break
        out.append(g[i])
        n += len(g[i])
    src["dict-gcide"] = [g[i] for i in sorted(keep[:len(out)])]
    docs = []
    for name in PACKAGES:
        n = sum(len(d) for d in src[name])
        log(f"  {name:22s} {len(src[name]):7d} docs {n / 1e6:8.2f} MB")
        docs.extend(src[name])
    rng = random.Random(SEED)
    rng.shuffle(docs)
    n_held = max(1, int(round(len(docs) * HELDOUT_FRACTION)))
    held, train = docs[:n_held], docs[n_held:]

    os.makedirs(args.out, exist_ok=True)
    for fn, part in (("train.txt", train), ("heldout.txt", held)):
        with open(os.path.join(args.out, fn), "w", encoding="utf-8") as f:
            for d in part:
                f.write(d)
                f.write("\n" + DOC_SEP + "\n")
    with open(os.path.join(args.out, "LICENSES.txt"), "w", encoding="utf-8") as f:
        for name in PACKAGES:
            cp = os.path.join(work, "root", name, "usr/share/doc", name, "copyright")
            if not os.path.exists(cp):
                cands = [os.path.join(dp, "copyright") for dp, _, fns in
                         os.walk(os.path.join(work, "root", name, "usr/share/doc")) if "copyright" in fns]
                cp = cands[0] if cands else None
            f.write(f"===== {name} {versions.get(name, '?')}\n")
            if cp:
                f.write(open(cp, encoding="utf-8", errors="replace").read())
            f.write("\n")
    tb = sum(len(d.encode()) for d in train)
    hb = sum(len(d.encode()) for d in held)
    log(f"train: {len(train)} docs {tb / 1e6:.2f} MB; held-out: {len(held)} docs {hb / 1e6:.2f} MB")

    # Held-out sample committed for engine tests: whole held-out documents (plain text, joined by
    # blank lines, no separator tokens) until sample-bytes is reached.
    if args.sample:
        os.makedirs(os.path.dirname(args.sample) or ".", exist_ok=True)
        out, n = [], 0
        for d in held:
            if n + len(d.encode()) > args.sample_bytes and out:
                break
            out.append(d)
            n += len(d.encode()) + 2
        with open(args.sample, "w", encoding="utf-8") as f:
            f.write("\n\n".join(out) + "\n")
        log(f"sample: {len(out)} held-out docs, {os.path.getsize(args.sample)} bytes -> {args.sample}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
