#!/usr/bin/env python3
"""Every repository path the docs cite in backticks exists (README.md, docs/*.md, the READMEs of
scripts, testdata and crates). Placeholders (TARGET, *, {...}, $VAR, <...>) and absolute or
home paths are skipped; a `file::test` reference checks the file. Exit 1 with the list when one
is missing.

usage: scripts/check_doc_paths.py
"""
import glob
import os
import re
import sys

ROOTS = ("scripts/", "crates/", "docs/", "testdata/", "tests/", "fuzz/", "models/", ".ci/")
CITED = re.compile(r"`([^`\s]*?(?:" + "|".join(re.escape(r) for r in ROOTS) + r")[^`\s]*)`")


def cited_paths(text):
    for m in CITED.finditer(text):
        p = m.group(1).split("::")[0].rstrip(".,:;)")
        p = re.sub(r"\[.*$", "", p)
        if any(ch in p for ch in "*{<$") or p.startswith(("/", "~", "../")):
            continue
        if re.search(r"/[A-Z][A-Z_]+(/|$)", p):  # a placeholder such as fuzz/corpus/TARGET/
            continue
        yield p


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    docs = ["README.md"] + sorted(glob.glob("docs/*.md"))
    docs += [f for f in sorted(glob.glob("**/README.md", recursive=True)) if "target/" not in f and f != "README.md"]
    missing = []
    for doc in docs:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        for p in cited_paths(text):
            here = os.path.join(os.path.dirname(doc), p)
            if not (os.path.exists(p) or os.path.exists(here)):
                missing.append(f"{doc}: `{p}`")
    if missing:
        print("paths cited in the docs that do not exist:")
        print("\n".join(sorted(set(missing))))
        return 1
    print(f"doc paths: {len(docs)} documents checked, every cited path exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
