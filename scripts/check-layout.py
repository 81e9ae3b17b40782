#!/usr/bin/env python3
"""The house rules a newcomer relies on (issue 12), checked by `make lint`:

1. No source file of a library or daemon crate is over MAX_LINES lines,
   not counting its unit tests (a trailing `#[cfg(test)] mod tests { ... }`
   block, or a `tests.rs` / `tests/` module file).
2. No module imports one that imports it back: within each crate, the graph
   of `crate::` and `super::` paths between modules has no cycle. A parent
   that declares its children and re-exports their items (`pub use`) is
   not importing them; anything else is an edge.

Prints every breach and exits 1 if there is one. Python stdlib only.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["broker", "provider", "client", "farm", "cas", "ledger", "schemas", "identity", "telemetry"]
MAX_LINES = 650

PATH_RE = re.compile(r"\b(crate|super|self)((?:::\s*[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def module_of(src, path):
    """The module path of a file: `a/b.rs` and `a/b/mod.rs` are `a::b`."""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


def code_lines(text):
    """Lines before a module's unit tests."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*mod tests\b", lines[i + 1]):
            return i
    return len(lines)


def strip_comments(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def is_test_module(module):
    return "tests" in module


def references(module, text, modules):
    """Modules of this crate that `module`'s code names, except re-exports."""
    code = strip_comments("\n".join(text.split("\n")[: code_lines(text)]))
    # A parent's `pub use child::X;` re-exports; it does not depend.
    code = re.sub(r"\bpub(\([^)]*\))?\s+use\s+[^;]*;", "", code)
    paths = []
    for m in GROUP_RE.finditer(code):
        base = m.group(2).replace(" ", "")
        for item in re.split(r",", m.group(3)):
            item = item.strip().split(" as ")[0].strip()
            if item:
                paths.append((m.group(1), base + "::" + item.replace(" ", "")))
    for m in PATH_RE.finditer(code):
        paths.append((m.group(1), m.group(2).replace(" ", "")))
    found = set()
    for anchor, rest in paths:
        names = [n for n in rest.split("::") if n and n != "self" and n != "{"]
        if anchor == "crate":
            base = ()
        elif anchor == "super":
            base = module[:-1]
            while names and names[0] == "super":
                base, names = base[:-1], names[1:]
        else:
            base = module
        target = base
        for n in names:
            if base + (n,) in modules or target + (n,) in modules:
                target = target + (n,)
            else:
                break
        if target != module and target in modules and not is_test_module(target):
            # Naming an ancestor's own items (a parent `mod.rs` holding
            # shared types) counts; naming one's own children does not
            # make a cycle on its own and is checked from the child.
            found.add(target)
    return found


def cycles(graph):
    """Pairs or longer loops in a directed graph (Tarjan's SCCs)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    breaches = []
    for crate in CRATES:
        src = os.path.join(ROOT, crate, "src")
        files = {}
        for dirpath, _, names in os.walk(src):
            for name in names:
                if name.endswith(".rs"):
                    path = os.path.join(dirpath, name)
                    files[module_of(src, path)] = path
        modules = set(files)
        graph = {}
        for module, path in sorted(files.items()):
            text = open(path, encoding="utf-8").read()
            if not is_test_module(module):
                n = code_lines(text)
                if n > MAX_LINES:
                    breaches.append(f"{os.path.relpath(path, ROOT)}: {n} lines of code (over {MAX_LINES})")
            if is_test_module(module) or os.path.basename(path) == "main.rs":
                continue
            graph[module] = {
                t for t in references(module, text, modules) if not (t[: len(module)] == module and module != ())
            }
            # An ancestor named by its child is fine only if the ancestor
            # does not name that child's subtree back: kept as an edge.
        for comp in cycles(graph):
            names = " <-> ".join("::".join(m) or "crate" for m in sorted(comp))
            breaches.append(f"{crate}: modules import each other: {names}")
    for b in breaches:
        print(f"check-layout: {b}", file=sys.stderr)
    if breaches:
        return 1
    print(f"check-layout: {len(CRATES)} crates, no file over {MAX_LINES} lines of code, no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
