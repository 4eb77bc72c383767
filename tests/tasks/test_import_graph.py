"""The project's modules import each other without circles (module- and function-level imports).

A circle works only as long as one side imports the other late (inside a function) or before
defining what the other needs; it breaks when someone moves an import, and it hides which module
owns what. The graph is read from the source with :mod:`ast`, so nothing is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "storage", "flows", "deployments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never run, so never a circle)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (functions included).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; no
    edge goes to the parent packages a submodule import also runs.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    """Every project module of :data:`PACKAGES` -> the project modules it imports."""
    modules = _project_modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components, key=sorted)


def _describe(cycles: list[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(cycle)) for cycle in cycles) or "none"


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    # tasks.model.loading imports tasks.data.synthetic inside a function only.
    assert "tasks.data.synthetic" in graph["tasks.model.loading"]
    assert "tasks.sweep.config" in graph["tasks.sweep.inputs"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        frozenset({"a", "b", "c"})
    ]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_sweep_accuracy_and_inputs_are_not_in_a_circle() -> None:
    graph = import_graph()
    assert "tasks.sweep.inputs" not in graph["tasks.sweep.accuracy"]
    together = [
        c for c in import_cycles(graph) if {"tasks.sweep.accuracy", "tasks.sweep.inputs"} & c
    ]
    assert together == [], f"import circles through the sweep: {_describe(together)}"


def test_no_import_cycles_among_project_modules() -> None:
    cycles = import_cycles(import_graph())
    assert cycles == [], f"import circles among project modules: {_describe(cycles)}"


def test_finetune_and_distributed_are_not_in_a_circle() -> None:
    graph = import_graph()
    assert "tasks.finetune" not in graph["tasks.distributed"]
