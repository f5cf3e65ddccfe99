"""The shape of the package: no import cycles between faceid's modules.

A cycle makes the import order matter and hides which module depends on which. The check reads every
module's import statements without importing anything: those that run at import time (``if
TYPE_CHECKING:`` blocks included) must form no cycle, and neither may all of them together with the
imports inside functions: a lazy import may save start-up time, but it must not be what breaks a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the faceid package."""
    found = {}
    for path in sorted((root / "faceid").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(tree: ast.Module, lazy: bool):
    """Import statements that run when the module is imported; with ``lazy``, those in functions too."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif lazy or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = SRC, lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the faceid modules its import executes (a module's packages included); with ``lazy``,
    also those that its functions import."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), lazy):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets.add(origin)
            targets.update(f"{origin}.{alias.name}" for alias in node.names)  # ``from pkg import module``
        for target in targets:
            if target not in modules:
                continue
            # Importing a.b.c runs a and a.b first, unless the importer lives inside them (then they
            # are already being imported and Python does not run them again).
            parts = target.split(".")
            chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            for step in chain:
                if step != name and not (name == step or name.startswith(step + ".")):
                    graph[name].add(step)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


@pytest.mark.parametrize("lazy", [False, True], ids=["import-time", "with-lazy-imports"])
def test_no_import_cycles(lazy):
    graph = import_graph(lazy=lazy)
    assert "faceid.pipeline" in graph and graph["faceid.pipeline"]  # the graph was read at all
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle(tmp_path):
    package = tmp_path / "faceid"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.b import B\n")
    (package / "sub" / "__init__.py").write_text("from .b import B\n")
    (package / "sub" / "b.py").write_text("from .. import a\n\ndef f():\n    from ..c import C\n")
    (package / "c.py").write_text("import faceid.a\n")
    assert find_cycles(import_graph(tmp_path)) == [["faceid.a", "faceid.sub", "faceid.sub.b"]]
    (package / "a.py").write_text("")  # no cycle at import time; the lazy import in b.f closes one
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import C\n")
    (package / "c.py").write_text("from .sub import b\n")
    assert find_cycles(import_graph(tmp_path)) == []
    assert find_cycles(import_graph(tmp_path, lazy=True)) == [["faceid.c", "faceid.sub", "faceid.sub.b"]]
