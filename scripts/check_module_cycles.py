#!/usr/bin/env python3
"""Dependency cycles between the top-level modules of each crate in crates/*.

A top-level module of crate X is crates/X/src/NAME.rs or crates/X/src/NAME/ (lib.rs and main.rs are
the crate root: not a module here, and their references are not counted). Module A depends on
module B when any file of A names `crate::B` — in a `use` (plain, `crate::{B, ...}`, nested
groups) or inline (`crate::B::f()`) — or reaches B through `super::` from a nested file or an
inline `mod` block. `crate::Item` where the root re-exports Item with `pub use B::...` counts as B.
Comments, doc comments and string/char literals are ignored.

Prints each crate's edges and every cycle (a strongly connected component of more than one
module; a module naming itself is not a cycle). Exit status 1 when a cycle exists.

    python3 scripts/check_module_cycles.py [--root DIR] [--crate NAME ...]
    python3 scripts/check_module_cycles.py --self-test
"""

import argparse
import os
import re
import sys
import tempfile

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ROOT_FILES = ("lib.rs", "main.rs")


# ------------------------------------------------------------------------------------------------
# Source text without comments and literals


def strip_code(text):
    """The text with comments removed and string/char literal contents blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
            out.append(" ")
            continue
        # Raw strings: r"..", r#".."#, br#".."#.
        m = re.match(r'b?r(#*)"', text[i : i + 260]) if c in "rb" and (i == 0 or not _ident_char(text[i - 1])) else None
        if m:
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j
            continue
        if c == '"' or (c == "b" and nxt == '"' and (i == 0 or not _ident_char(text[i - 1]))):
            i += 1 if c == '"' else 2
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    out.append("\n")
                i += 1
            i += 1
            out.append('""')
            continue
        if c == "'":
            # A char literal ('x', '\n', '\u{..}') or a lifetime / label ('a).
            m = re.match(r"'(\\(u\{[0-9a-fA-F]*\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'", text[i : i + 16])
            if m:
                out.append("' '")
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _ident_char(ch):
    return ch.isalnum() or ch == "_"


# ------------------------------------------------------------------------------------------------
# Paths named in one file


def _skip_ws(s, i):
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _sep(s, i):
    """Index after `::` (with spaces around), or None."""
    j = _skip_ws(s, i)
    if s.startswith("::", j):
        return _skip_ws(s, j + 2)
    return None


def _group_heads(s, i):
    """`{a, b::c, {d}}` starting at s[i] == '{': the first segment of each item, and the end."""
    heads, depth, item_start = [], 0, True
    j = i
    while j < len(s):
        ch = s[j]
        if ch == "{":
            depth += 1
            item_start = depth == 1
            j += 1
            continue
        if ch == "}":
            depth -= 1
            j += 1
            if depth == 0:
                return heads, j
            continue
        if ch == "," and depth == 1:
            item_start = True
            j += 1
            continue
        if depth == 1 and item_start and not ch.isspace():
            m = IDENT.match(s, j)
            if m:
                heads.append(m.group(0))
                j = m.end()
            else:
                j += 1
            item_start = False
            continue
        j += 1
    return heads, j


def _inline_mods(code):
    """(start, end, name) of every inline `mod NAME { ... }` block."""
    spans = []
    for m in re.finditer(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*\{", code):
        depth, j = 0, m.end() - 1
        while j < len(code):
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        spans.append((m.end(), j, m.group(1)))
    return spans


def references(code, module_path):
    """Top-level module names (or root items) this file's code names, resolved from its module path
    (e.g. ["foo", "bar"] for src/foo/bar.rs)."""
    names = set()
    mods = _inline_mods(code)

    def path_at(pos):
        return module_path + [name for (a, b, name) in mods if a <= pos < b]

    def after(j):
        """Names at s[j]: an identifier or the heads of a `{...}` group."""
        if j is None or j >= len(code):
            return []
        if code[j] == "{":
            return _group_heads(code, j)[0]
        m = IDENT.match(code, j)
        return [m.group(0)] if m else []

    for m in re.finditer(r"\bcrate\b", code):
        if m.start() > 0 and (code[m.start() - 1] == "$" or _ident_char(code[m.start() - 1])):
            continue
        for name in after(_sep(code, m.end())):
            names.add(name)
    chained = set()
    for m in re.finditer(r"\bsuper\b", code):
        s0 = m.start()
        if s0 in chained:
            continue  # a later segment of a super::super:: chain
        if s0 > 0 and (_ident_char(code[s0 - 1]) or code[max(0, s0 - 2) : s0] == "::"):
            continue  # part of another path (`x::super` is not valid Rust anyway)
        k, j = 1, _sep(code, m.end())
        while j is not None and code.startswith("super", j) and not _ident_char(code[j + 5 : j + 6] or " "):
            chained.add(j)
            k += 1
            j = _sep(code, j + 5)
        path = path_at(s0)
        if len(path) - k > 0:
            names.add(path[0])  # stays inside the same top-level module
        elif len(path) - k == 0:
            for name in after(j):
                names.add(name)
    return names


# ------------------------------------------------------------------------------------------------
# Crates


def crate_modules(src):
    mods = set()
    for e in os.listdir(src):
        p = os.path.join(src, e)
        if e.endswith(".rs") and e not in ROOT_FILES and os.path.isfile(p):
            mods.add(e[:-3])
        elif os.path.isdir(p) and e != "bin":
            mods.add(e)
    return mods


def module_files(src, mod):
    """(path, module path) of each file of top-level module `mod`."""
    files = []
    f = os.path.join(src, mod + ".rs")
    if os.path.isfile(f):
        files.append((f, [mod]))
    d = os.path.join(src, mod)
    if os.path.isdir(d):
        for base, _, names in os.walk(d):
            for name in sorted(names):
                if not name.endswith(".rs"):
                    continue
                rel = os.path.relpath(os.path.join(base, name), d)[:-3].split(os.sep)
                if rel[-1] == "mod":
                    rel = rel[:-1]
                files.append((os.path.join(base, name), [mod] + rel))
    return files


def root_reexports(src, mods):
    """Item name -> module for the root's `pub use MOD::...::Item` / `pub use MOD::{A, B}`."""
    out = {}
    for root in ROOT_FILES:
        p = os.path.join(src, root)
        if not os.path.isfile(p):
            continue
        code = strip_code(open(p, encoding="utf-8").read())
        for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+(?:crate\s*::\s*|self\s*::\s*)?([^;]+);", code):
            body = m.group(1)
            head = IDENT.match(body)
            if not head or head.group(0) not in mods:
                continue
            mod = head.group(0)
            # Every identifier after the last `::` segment(s): the items brought in.
            for item in re.findall(r"(?:::\s*|[{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*(?=[,}]|$|\s+as\b)", body):
                out.setdefault(item, mod)
            for alias in re.findall(r"\bas\s+([A-Za-z_][A-Za-z0-9_]*)", body):
                out.setdefault(alias, mod)
    return out


def crate_graph(src):
    mods = crate_modules(src)
    reexp = root_reexports(src, mods)
    edges = {m: set() for m in mods}
    for mod in mods:
        for path, mpath in module_files(src, mod):
            code = strip_code(open(path, encoding="utf-8").read())
            for name in references(code, mpath):
                target = name if name in mods else reexp.get(name)
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def sccs(edges):
    """Tarjan's strongly connected components."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def example_cycle(edges, comp):
    """One cycle through the component's first module (shortest, by BFS)."""
    start, members = comp[0], set(comp)
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def check(root, only=None, out=sys.stdout):
    """Prints the graphs; returns the number of cycles found."""
    crates_dir = os.path.join(root, "crates")
    cycles = 0
    for crate in sorted(os.listdir(crates_dir)):
        src = os.path.join(crates_dir, crate, "src")
        if not os.path.isdir(src) or (only and crate not in only):
            continue
        edges = crate_graph(src)
        print(f"crate {crate}: {len(edges)} top-level modules", file=out)
        for m in sorted(edges):
            if edges[m]:
                print(f"  {m} -> {', '.join(sorted(edges[m]))}", file=out)
        for comp in sccs(edges):
            if len(comp) > 1:
                cycles += 1
                print(f"  CYCLE among {{{', '.join(comp)}}}: e.g. {' -> '.join(example_cycle(edges, comp))}", file=out)
    return cycles


# ------------------------------------------------------------------------------------------------
# Self-test


def self_test():
    files = {
        "crates/demo/src/lib.rs": "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub mod e;\n"
        "pub use e::Thing;\npub use crate::d::{Other, more::Deep as Alias};\nuse crate::a::x; // root: ignored\n",
        # a -> b (plain use), a -> c (nested group); comments, doc comments and strings ignored.
        "crates/demo/src/a.rs": "//! Uses crate::d in a doc comment only.\n"
        "use crate::b::f;\nuse crate::{c::{x, y}, self as me};\n"
        "/* block crate::d /* nested crate::d */ still comment crate::d */\n"
        'fn s() -> &\'static str { "crate::d::in_string" }\n'
        "fn l<'a>(x: &'a u8) -> char { let _ = r#\"crate::d raw\"#; 'x' }\n"
        "/// crate::e in a doc comment\nfn g() {}\n",
        # b -> c inline path; b -> a (makes the a <-> b cycle).
        "crates/demo/src/b.rs": "pub fn f() { crate::c::inner::h(); }\nfn k() { crate :: a :: x(); }\n",
        # c/inner.rs: super:: is c (self, ignored); super::super::d is d.
        "crates/demo/src/c/mod.rs": "pub mod inner;\nuse super::e::Thing;\n",
        "crates/demo/src/c/inner.rs": "use super::mod_local;\nuse super::super::{d::z, b};\n"
        "pub fn h() {}\nmod tests {\n    use super::super::super::e::X;\n}\n",
        # d: a macro's $crate is not a reference; an inline mod's super:: is d itself.
        "crates/demo/src/d.rs": "macro_rules! m { () => { $crate::a::x() } }\nmod t { use super::*; }\n"
        "pub mod more { pub struct Deep; }\npub struct Other;\n",
        # e -> d through the root re-export `Other` (and no cycle: d does not depend on e).
        "crates/demo/src/e.rs": "pub struct Thing;\nfn f(_: crate::Other, _: crate::Alias) {}\n",
        "crates/clean/src/main.rs": "mod x;\nmod y;\nfn main() { x::f(); }\n",
        "crates/clean/src/x.rs": "pub fn f() { crate::y::g() }\n",
        "crates/clean/src/y.rs": "pub fn g() {}\n",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rel, text in files.items():
            p = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
        got = crate_graph(os.path.join(tmp, "crates/demo/src"))
        want = {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"b", "d", "e"}, "d": set(), "e": {"d"}}
        assert got == want, f"demo edges: got {got}, want {want}"
        comps = [c for c in sccs(got) if len(c) > 1]
        assert comps == [["a", "b", "c"]], comps
        assert example_cycle(got, comps[0]) == ["a", "b", "a"], example_cycle(got, comps[0])
        clean = crate_graph(os.path.join(tmp, "crates/clean/src"))
        assert clean == {"x": {"y"}, "y": set()}, clean
        import io

        buf = io.StringIO()
        assert check(tmp, out=buf) == 1, buf.getvalue()
        assert "CYCLE among {a, b, c}" in buf.getvalue(), buf.getvalue()
        assert check(tmp, only={"clean"}, out=io.StringIO()) == 0
    assert strip_code('let s = "a // b"; // c\n') == 'let s = ""; \n'
    print("self-test ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--crate", action="append", help="only this crate (directory name under crates/)")
    ap.add_argument("--self-test", action="store_true", help="check the checker on a small synthetic tree")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return 0
    n = check(os.path.abspath(a.root), set(a.crate) if a.crate else None)
    print(f"{n} cycle(s)" if n else "no cycles")
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
