"""The package's shape: imports point one way (no cycle between lorakit's modules), and
every module is short enough to hold in one's head.

The import graph is read from the source with ``ast``: every ``import`` and ``from ...
import`` anywhere in a module, inside functions too (a lazy import that points back up
is still a cycle, only one that import order hides), and ``importlib.import_module`` of
a literal name. Imports under ``if TYPE_CHECKING:`` never run and are left out.
Importing ``a.b.c`` also runs the ``__init__`` of the packages ``a.b`` and ``a``, so
those count as imported too, except the importer's own enclosing packages (Python
initialises them before the importer, whatever the order).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import lorakit

ROOT = Path(lorakit.__file__).parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the lorakit package."""
    modules = {}
    for file in sorted(ROOT.rglob("*.py")):
        parts = ("lorakit", *file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """``(dotted name, line)`` of everything ``tree`` imports; ``from X import n`` gives ``X.n``
    (a submodule or not: the caller decides), relative imports resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, tuple[str, int]]]:
    """``{module: {imported module: (file, line)}}`` within the lorakit package."""
    modules = _modules()
    graph: dict[str, dict[str, tuple[str, int]]] = {name: {} for name in modules}
    for name, file in modules.items():
        tree = ast.parse(file.read_text(), filename=str(file))
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target, line in _imported_names(tree, name, file.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module itself and every package above it
                dotted = ".".join(parts[:i])
                if dotted in modules and dotted != name and dotted not in own_packages:
                    graph[name].setdefault(dotted, (str(file.relative_to(ROOT.parent)), line))
    return graph


def find_cycles(graph: dict[str, dict[str, tuple[str, int]]]) -> list[list[str]]:
    """Cycles of ``graph``, one at a time: each found cycle's closing edge is set aside
    and the search runs again, so every independent cycle is named."""
    edges = {m: dict(targets) for m, targets in graph.items()}
    cycles = []
    while True:
        try:
            graphlib.TopologicalSorter({m: set(t) for m, t in edges.items()}).prepare()
            return cycles
        except graphlib.CycleError as error:
            cycle = list(reversed(error.args[1]))  # graphlib lists it against the edges' direction
            cycles.append(cycle)
            del edges[cycle[-2]][cycle[-1]]


def _describe(graph, cycle: list[str]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        file, line = graph[a][b]
        steps.append(f"{a} -> {b} ({file}:{line})")
    return "\n    ".join(steps)


def test_the_graph_sees_lazy_imports_and_skips_type_checking_blocks():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lorakit.train\n"
              "def f():\n    from lorakit.model import attach\n    from .layers import base\n")
    names = {n for n, _ in _imported_names(ast.parse(source), "lorakit.io", False)}
    assert {"lorakit.model", "lorakit.model.attach", "lorakit.layers", "lorakit.layers.base"} <= names
    assert "lorakit.train" not in names


def test_find_cycles_names_every_cycle():
    graph = {"a": {"b": ("a.py", 1)}, "b": {"a": ("b.py", 3)}, "c": {"d": ("c.py", 1)}, "d": {"c": ("d.py", 1)},
             "e": {"a": ("e.py", 1)}}
    assert sorted(sorted(c[:-1]) for c in find_cycles(graph)) == [["a", "b"], ["c", "d"]]


def test_no_import_cycle_in_lorakit():
    graph = import_graph()
    assert len(graph) > 50 and graph["lorakit.model"]  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in lorakit (each edge: importer -> imported (where)):\n  " + "\n  ".join(
        "cycle:\n    " + _describe(graph, c) for c in cycles)


def _line_counts() -> dict[str, int]:
    return {name: len(file.read_text().splitlines()) for name, file in _modules().items()}


def test_no_module_is_over_400_lines():
    over = {name: n for name, n in _line_counts().items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split each along its jobs): {over}"


# Tests that are about the package's shape rather than one module of it.
SHAPE_TESTS = {"imports"}


def test_every_test_file_is_named_after_a_module_or_folder():
    """``tests/test_a_b.py`` tests ``lorakit/a/b.py`` or the folder ``lorakit/a/b/`` (or
    ``benchmarks/b.py`` for ``test_benchmarks_b.py``), so a module's tests are found by its name."""
    names = {"benchmarks"} | {f"benchmarks_{p.stem}" for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py")}
    for dotted in _modules():
        parts = dotted.split(".")[1:]
        names.update("_".join(parts[:i]) for i in range(1, len(parts) + 1))
    tests = Path(__file__).parent.glob("test_*.py")
    stray = sorted(t.name for t in tests if t.stem[len("test_"):] not in names | SHAPE_TESTS)
    assert not stray, f"test files named after no module or folder of lorakit: {stray}"
