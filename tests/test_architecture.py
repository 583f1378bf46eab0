"""The architecture as a test: no import cycles, and each layer imports only the layers below it.

The import graph is read from the source with :mod:`ast` (no module is executed). Imports must form no cycle
(a module-level cycle makes the import order matter and breaks partially initialised modules; a function-local
one hides two modules that need each other); every import must respect the layering of docs/architecture.md.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "segcal"

#: what each top-level part of segcal may import (besides itself); docs/architecture.md draws the same picture
ALLOWED: dict[str, set[str]] = {
    "functional": set(),
    "io": set(),
    "metrics": {"functional"},
    "losses": {"functional"},
    "plots": {"functional", "io"},
    "posthoc": {"functional", "io"},
    "evaluation": {"functional", "io"},
    "data": {"functional", "io"},
    "report": {"functional", "io", "plots", "evaluation"},
    "training": {"functional", "io", "losses", "metrics", "posthoc"},
    "integrations": {"functional", "io", "metrics", "posthoc", "plots"},
    "demo": {"functional", "io", "metrics", "losses", "plots", "posthoc", "evaluation", "data", "report",
             "training"},
    "cli": {"functional", "io", "metrics", "losses", "plots", "posthoc", "evaluation", "data", "report",
            "training", "demo"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported (``if TYPE_CHECKING:`` blocks excluded)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
            for h in node.handlers:
                out += _module_level(h.body)
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    """The segcal modules an import statement loads (a name imported from a package that is a submodule counts
    as that submodule)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
    out = set()
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in mods else base)
    return {t for t in out if t in mods}


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = _module_level(tree.body) if module_level_only else [
            n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
        ]
        is_pkg = path.name == "__init__.py"
        graph[name] = set().union(*(_targets(n, name, is_pkg, mods) for n in nodes)) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module_level_only", [True, False])
def test_no_import_cycles(module_level_only: bool) -> None:
    """No cycle among module-level imports (import-time), nor among all imports (a function-local import that
    closes a cycle is a design cycle too: two modules that need each other)."""
    graph = _graph(module_level_only)
    assert len(graph) > 40  # every module was read
    assert _cycles(graph) == []


def test_layers_import_only_what_they_may() -> None:
    bad = []
    for module, deps in _graph(module_level_only=False).items():
        part = _part(module)
        assert part in ALLOWED, f"{module}: add its package to ALLOWED and docs/architecture.md"
        for d in deps:
            if _part(d) != part and _part(d) not in ALLOWED[part] and _part(d) != "__init__":
                bad.append(f"{module} imports {d}")
    assert bad == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    code += "print('ok', len(sys.argv) - 1)"
    out = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(names))]


@pytest.mark.parametrize("module", ["segcal.functional", "segcal.io"])
def test_the_core_layers_import_nothing_above_them(module: str) -> None:
    graph = _graph(module_level_only=False)
    part = _part(module)
    above = {d for m, ds in graph.items() if _part(m) == part for d in ds if _part(d) != part}
    assert above <= {"segcal"}
