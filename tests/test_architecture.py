"""The layers of the house: every import inside the package points down (or within its layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import deepalign

LAYERS = ["errors", "core", "data", "zoo", "lmc", "solvers", "nn", "training", "bench", "cli"]
ROOT = Path(deepalign.__file__).parent


def _layer(module: str) -> int:
    """Rank of ``deepalign.<layer>...``; the package's own top (``deepalign``) is above all."""
    parts = module.split(".")
    if parts[0] != "deepalign":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("__main__", "api"):
        return len(LAYERS)
    return LAYERS.index(parts[1])


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``deepalign...`` module a file imports: import statements anywhere in the file (also
    inside functions) and strings given to ``importlib.import_module``."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))  # and its submodules imported by name:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
    return [(line, m) for line, m in found if m.split(".")[0] == "deepalign"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_import_points_down():
    wrong = []
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    assert len(files) > 50
    for path in files:
        me = _module_name(path)
        for line, target in _imports(path):
            if target in modules and _layer(target) > _layer(me):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lower layer importing a higher one (even lazily) is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    import importlib\n    importlib.import_module('deepalign.nn.model')\n"
    )
    assert _imports(bad) == [(3, "deepalign.nn.model")]
    assert _module_name(ROOT / "nn" / "model.py") == "deepalign.nn.model"
    assert _layer("deepalign.nn.model") > _layer("deepalign.solvers.registry")
    assert _layer("deepalign") > _layer("deepalign.cli.app")


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for me, path in modules.items():
        graph[me] = {t for _, t in _imports(path) if t in modules and t != me}
    return graph


def test_no_module_imports_itself_back():
    """No circles between modules (packages' ``__init__`` re-exports aside)."""
    graph = _graph()
    packages = {m for m in graph if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()}
    cycles = []
    for start in graph:
        if start in packages:
            continue
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in seen and nxt not in packages:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:20])
