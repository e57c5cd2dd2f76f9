"""The layering of ``scalselect_fast.data``: its modules import each other without a cycle.

The import graph is read from the source (every ``import`` statement, also those inside functions,
where a cycle could otherwise hide), so a back edge fails here even where Python would import the
modules without complaint.
"""
from __future__ import annotations

import ast
from pathlib import Path

import scalselect_fast.data

PACKAGE = "scalselect_fast.data"
DATA_DIR = Path(scalselect_fast.data.__file__).parent


def _modules() -> dict[str, Path]:
    """Module name (``"readers"``, ``"__init__"`` for the package) -> its file."""
    return {p.stem: p for p in sorted(DATA_DIR.glob("*.py"))}


def _targets(node: ast.ImportFrom | ast.Import, modules: dict[str, Path]) -> list[str]:
    """The modules of the package that one import statement imports (``"__init__"`` for the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level == 1:  # from .x import y / from . import x
        if node.module:
            names = [f"{PACKAGE}.{node.module}"]
        else:
            names = [f"{PACKAGE}.{a.name}" if a.name in modules else PACKAGE for a in node.names]
    elif node.level == 0 and node.module:
        base = node.module
        names = [f"{base}.{a.name}" if base == PACKAGE and a.name in modules else base for a in node.names]
    else:  # from .. import x: outside the package
        names = []
    out = []
    for name in names:
        if name == PACKAGE:
            out.append("__init__")
        elif name.startswith(PACKAGE + "."):
            out.append(name[len(PACKAGE) + 1:].split(".")[0])
    return out


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, modules):
                    if target != name:
                        edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_reader_sees_the_edges():
    graph = _graph()
    # the package imports the containers; the read loop imports the record rules; formats import sources
    assert {"json_list", "jsonl", "parquet", "hf", "webdataset", "readers"} <= set(graph["__init__"])
    assert "records" in graph["readers"] and "sources" in graph["parquet"]


def test_finds_a_cycle_when_there_is_one():
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


def test_data_modules_import_without_a_cycle():
    graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = ", ".join(f"{a}.py:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle in {PACKAGE}: {' -> '.join(cycle)} ({steps}); move the shared "
                             "job to the lower module")


def test_no_data_module_imports_the_package():
    # a submodule importing the package __init__ would close a cycle through every container
    graph = _graph()
    assert [m for m, edges in graph.items() if m != "__init__" and "__init__" in edges] == []


def test_package_internal_imports_are_at_module_level():
    # an import inside a function is how a back edge used to hide; none is needed now
    inner = []
    modules = _modules()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and _targets(node, modules):
                inner.append(f"{name}.py:{node.lineno}")
    assert inner == []
