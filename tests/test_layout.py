"""The package follows the flow: each stage imports only the ground floor and the stages before
it, and no module imports another that (directly or not) imports it back, not even under
TYPE_CHECKING or inside a function. Read from the source, so it holds for every import."""

from __future__ import annotations

import ast
from pathlib import Path

import xnat_inbox

PACKAGE = Path(xnat_inbox.__file__).parent
#: the stages in the order of the flow; a module not under one of them is the ground floor
STAGES = ["intake", "reading", "routing", "senders", "outcome", "service", "commands"]


def module_name(path: Path) -> str:
    parts = ["xnat_inbox", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules this one imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:  # `from pkg import module` imports that module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {target for target in found if target in known and target != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(name, path, known) for name, path in found.items()}


def stage_of(name: str) -> int:
    """0 for the ground floor, then 1… in the order of the flow; `__main__` comes last."""
    parts = name.split(".")
    if parts[1:] == ["__main__"]:
        return len(STAGES) + 1
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1]) + 1
    return 0


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_checks_see_a_cycle_and_a_backward_import():
    """The checks themselves: a planted cycle and an import against the flow are found."""
    edges = {"xnat_inbox.a": {"xnat_inbox.b"}, "xnat_inbox.b": {"xnat_inbox.c"},
             "xnat_inbox.c": {"xnat_inbox.a"}, "xnat_inbox.d": set()}
    assert cycles(edges) == [["xnat_inbox.a", "xnat_inbox.b", "xnat_inbox.c"]]
    assert stage_of("xnat_inbox.intake.claim") < stage_of("xnat_inbox.reading.scan")
    assert stage_of("xnat_inbox.config") == 0
    found = modules()
    edges = graph()
    assert len(found) > 40 and "xnat_inbox.service.daemon" in edges
    assert "xnat_inbox.service.pipeline" in edges["xnat_inbox.service.daemon"]


def test_no_import_cycle_anywhere_in_the_package():
    assert cycles(graph()) == []


def test_imports_point_down_the_flow():
    backward = sorted(f"{name} imports {target}"
                      for name, targets in graph().items() for target in targets
                      if stage_of(target) > stage_of(name))
    assert backward == []


def test_every_stage_says_what_it_does_and_imports_nothing():
    """A sub-package's __init__ is its one docstring: importing a stage runs no other code,
    so a module never drags in its siblings through its package."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        if init.parent == PACKAGE:
            continue
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} has no docstring"
        code = [node for node in tree.body
                if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        assert code == [], f"{init} does more than describe its stage"
