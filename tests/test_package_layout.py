"""The package's naming rules, read from the source: a private name (``_x``) stays in its module.

A name that another module needs is part of its module's interface and is spelled without the
underscore; a name with one is free to change with its module alone. Checked for ``from m import _x``
and for ``m._x`` where ``m`` is a module of the package bound by an import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import scalselect_fast

ROOT = Path(scalselect_fast.__file__).parent
#: the compiled extension is imported by its loader only, under the extension's own name
ALLOWED = {("native.py", "_native")}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_package_module(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "scalselect_fast"


def crossings(path: Path, root: Path = ROOT) -> list[str]:
    """``"file:line name"`` for each private name of another package module this file uses."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = path.relative_to(root).as_posix()
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_package_module(node):
            for alias in node.names:
                if _private(alias.name) and (path.name, alias.name) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno} {alias.name}")
                module_aliases.add(alias.asname or alias.name)  # may be a module (from . import native)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "scalselect_fast":
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and node.value.id not in ("self", "cls")):
            target = _module_file(node.value.id, root)
            if target is not None and target != path:
                found.append(f"{rel}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def _module_file(name: str, root: Path) -> Path | None:
    """The package module a bare imported name refers to, if it is one (``native`` -> native.py)."""
    hits = list(root.rglob(f"{name}.py")) + [p / "__init__.py" for p in root.rglob(name) if p.is_dir()]
    return hits[0] if len(hits) == 1 else None


def test_checker_sees_both_spellings(tmp_path):
    (tmp_path / "subspace").mkdir()
    (tmp_path / "subspace" / "passes.py").write_text("def _hidden(): pass\n")
    (tmp_path / "native.py").write_text("def _secret(x): return x\n")
    probe = tmp_path / "probe.py"
    probe.write_text("from .subspace.passes import _hidden\nfrom . import native\nnative._secret(1)\n"
                     "from .native import public\n")
    assert [c.split(" ", 1)[1] for c in crossings(probe, tmp_path)] == ["_hidden", "native._secret"]


def test_private_names_stay_in_their_module():
    found = [c for p in sorted(ROOT.rglob("*.py")) for c in crossings(p)]
    assert found == [], ("private names used outside their module (drop the underscore where the name is "
                         "part of the module's interface, or move the job):\n" + "\n".join(found))
