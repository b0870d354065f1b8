"""Layering holds by test: the pure core imports no I/O, and components form no import cycle.

A component is a top-level package or module of ``src/cellcloud``; ``cli``, ``__init__`` and
``__main__`` are the entry points that may import everything. Every import counts, including
those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import pathlib

import cellcloud

ROOT = pathlib.Path(cellcloud.__file__).parent
ENTRY_POINTS = {"cli", "__init__", "__main__"}
IO_MODULES = {"asyncio", "socket", "subprocess", "sqlite3", "os", "shutil", "urllib", "http",
              "ssl", "select", "selectors", "threading", "multiprocessing", "time", "signal",
              "ctypes", "fcntl", "mmap", "tempfile", "pathlib", "io_uring"}


def _imports(text: str, rel: tuple[str, ...]) -> list[tuple[str, int, bool]]:
    """(target, line, internal) for every import in one file (``rel``: its path parts below
    the package); internal targets are given relative to the cellcloud package."""
    out: list[tuple[str, int, bool]] = []
    for n in ast.walk(ast.parse(text)):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                pkg = list(rel[:-1])
                base = pkg[: len(pkg) - (n.level - 1)] if n.level > 1 else pkg
                names = [".".join(base + ([n.module] if n.module else []))]
                if not n.module:  # from . import x: each name is a module of that package
                    names = [".".join(base + [a.name]) for a in n.names]
                out += [(t, n.lineno, True) for t in names]
            elif n.module:
                internal = n.module.startswith("cellcloud.")
                out.append((n.module.removeprefix("cellcloud."), n.lineno, internal))
        elif isinstance(n, ast.Import):
            for a in n.names:
                internal = a.name.startswith("cellcloud.")
                out.append((a.name.removeprefix("cellcloud."), n.lineno, internal))
    return out


def _graph() -> tuple[dict[str, dict[str, str]], list[str]]:
    edges: dict[str, dict[str, str]] = {}
    core_io: list[str] = []
    for f in sorted(ROOT.rglob("*.py")):
        comp = f.relative_to(ROOT).parts[0].removesuffix(".py")
        for target, line, internal in _imports(f.read_text(), f.relative_to(ROOT).parts):
            where = f"{f.relative_to(ROOT)}:{line}"
            if not internal:
                if comp == "core" and target.split(".")[0] in IO_MODULES:
                    core_io.append(f"{where} imports {target}")
                continue
            head = target.split(".")[0]
            if head and head != comp and head not in ENTRY_POINTS:
                edges.setdefault(comp, {}).setdefault(head, where)
    return edges, core_io


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(set(edges) | {w for outs in edges.values() for w in outs}):
        if v not in index:
            visit(v)
    return found


def test_core_imports_no_io() -> None:
    _, core_io = _graph()
    assert core_io == [], "core/ must take its I/O from its shells:\n" + "\n".join(core_io)


def test_components_form_no_cycle() -> None:
    edges, _ = _graph()
    cycles = _cycles(edges)
    detail = [" -> ".join(c) + ": " + "; ".join(
        f"{a}->{b} at {edges[a][b]}" for a in c for b in c if b in edges.get(a, {}))
        for c in cycles]
    assert cycles == [], "import cycles between components:\n" + "\n".join(detail)


def test_the_checker_sees_a_planted_cycle_and_io() -> None:
    # Negative control: the checks above would notice what they look for.
    assert _cycles({"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": "x"}, "b": {}}) == []
    assert ("os", 1, False) in _imports("import os\n", ("core", "x.py"))
    assert ("frontend", 1, True) in _imports("from ..frontend import store\n",
                                                   ("control", "x.py"))
