"""The import structure, read from the source: no import circle, and no component package imports another.

Imports are read with :mod:`ast` from every module of the project (lazy imports inside functions count too),
so a circle cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "defenses", "purifiers", "finetune", "experiments")
#: the component packages: each may use the core (harness) but no other component package
COMPONENTS = ("defenses", "purifiers", "finetune")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(p, m, known) for m, p in mods.items()}
    # importing a.b.c also runs a/__init__ and a/b/__init__: a package's own __init__ is not an edge of its
    # submodules, so only explicit imports count
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def test_the_reader_sees_imports_and_finds_a_planted_circle():
    graph = _graph()
    assert "harness.pipeline" in graph["harness.run"]
    assert "harness.pgd" in graph["defenses.photoguard"]
    planted = {**graph, "harness.types": graph["harness.types"] | {"harness.run"}}
    assert any("harness.types" in c for c in _cycles(planted))


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_no_component_package_imports_another_and_the_core_imports_none():
    bad = []
    for module, deps in _graph().items():
        for dep in deps:
            if _top(dep) == _top(module):
                continue
            if _top(module) in COMPONENTS and _top(dep) in COMPONENTS:
                bad.append(f"{module} -> {dep} (a component package imports another)")
            if _top(module) == "harness" and _top(dep) in COMPONENTS:
                bad.append(f"{module} -> {dep} (the core imports a component; wire it through its config)")
    assert bad == []
