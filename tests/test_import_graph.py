"""The package's import graph: no cycles, and the ground floor (``errors.py``) imports nothing.

The graph counts every import of a ``sphere_lightning`` module, at module level and inside
functions alike (an import hidden in a function to dodge a cycle is still a dependency), except
those under ``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs the packages ``a.b`` (its
``__init__``), so an import from outside a package adds an edge to that package too: that is how
``callbacks/__init__.py``, which imports every callback, can close a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

PACKAGE = "sphere_lightning"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every dotted name ``node`` and the code in it import (``from a import b`` gives ``a`` and
    ``a.b``, which may be a module or a name in ``a``), skipping ``if TYPE_CHECKING:`` blocks."""
    if isinstance(node, ast.If) and _is_type_checking(node):
        for child in node.orelse:
            yield from _imported_names(child, module, is_package)
        return
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        yield source
        yield from (f"{source}.{alias.name}" for alias in node.names)
    for child in ast.iter_child_nodes(node):
        yield from _imported_names(child, module, is_package)


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """``{module: the sphere_lightning modules it imports}`` for every module of the package
    (``a.b`` for ``a/b.py`` and ``a/b/__init__.py``), with the package ``__init__`` modules an
    import runs from outside them."""
    paths = {_module_name(path): path for path in SOURCE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, frozenset[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets: set[str] = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            target = resolve(name) if name.split(".")[0] == PACKAGE else None
            if target is None:
                continue
            targets.add(target)
            parts = target.split(".")
            for end in range(2, len(parts)):
                parent = ".".join(parts[:end])
                if parent in paths and not (module == parent or module.startswith(parent + ".")):
                    targets.add(parent)
        targets.discard(module)
        graph[module] = frozenset(targets)
    return graph


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, …, a]``, or ``None`` if it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def imports_of(prefix: str) -> dict[str, frozenset[str]]:
    """The edges of :func:`import_graph` from the modules named ``prefix`` or under it."""
    return {
        module: targets
        for module, targets in import_graph().items()
        if module == prefix or module.startswith(prefix + ".")
    }


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "sphere_lightning.module" in graph
    assert "sphere_lightning.models.architectures" in graph["sphere_lightning.editors.base"]
    # An import inside a function counts; one under `if TYPE_CHECKING:` does not.
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sphere_lightning.module import EditingModule\n"
        "def f():\n    from sphere_lightning.errors import ConfigError\n"
    )
    names = set(_imported_names(tree, "sphere_lightning.x", False))
    assert "sphere_lightning.errors.ConfigError" in names
    assert not any(name.startswith("sphere_lightning.module") for name in names)


def test_find_cycle():
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset()}) is None
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"a"})}) == ["a", "b", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_errors_imports_nothing_from_the_package():
    assert import_graph()["sphere_lightning.errors"] == frozenset()


def test_the_ground_floor_imports_only_the_ground_floor():
    ground = {"sphere_lightning.errors", "sphere_lightning.cache", "sphere_lightning.paths"}
    for module in ground:
        assert import_graph()[module] <= ground, module


#: The core: the LightningModule and what it is built from, below the callbacks.
CORE = (
    "sphere_lightning.module",
    "sphere_lightning.editors",
    "sphere_lightning.functional",
    "sphere_lightning.models",
    "sphere_lightning.data",
)
CALLBACKS = "sphere_lightning.callbacks"


def _reachable(start: str) -> dict[str, str]:
    """``{module: the module that first imported it}`` for every module ``start`` runs."""
    graph, seen, todo = import_graph(), {start: start}, [start]
    while todo:
        node = todo.pop()
        for target in sorted(graph.get(node, ())):
            if target not in seen:
                seen[target] = node
                todo.append(target)
    return seen


def test_the_core_does_not_import_the_callbacks():
    """Neither directly nor through another module: the callbacks build on the core."""
    for prefix in CORE:
        for module in imports_of(prefix):
            parents = _reachable(module)
            reached = sorted(m for m in parents if m == CALLBACKS or m.startswith(CALLBACKS + "."))
            if reached:
                chain, node = [reached[0]], reached[0]
                while node != module:
                    node = parents[node]
                    chain.append(node)
                raise AssertionError(f"{module} imports callbacks: " + " <- ".join(chain))
