"""The shape docs/architecture.md promises, checked on the source: modules of a readable size, imports
that go one way, no cluster branches in the daemon or the steps, no behaviour on free-text stages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "konfuzio_watch"
MAX_LINES = 500
# Where being alone or a node of a cluster must not be asked: it is chosen once, elsewhere.
NO_CLUSTER_BRANCHES = ("daemon.py", "runner.py", "placing.py", "recovery.py", "pipeline.py", "steps")
CHOOSERS = {"node_strategy"}  # the one place recovery picks its node strategy


def modules() -> dict[str, Path]:
    """Dotted module name -> file, outside the emulator (a test fixture of its own)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "emulator" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports when it runs: type-only imports (under
    ``if TYPE_CHECKING:``) left out, imports inside functions counted."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                for candidate in (f"{target}.{alias.name}", target):
                    if candidate in known:
                        found.add(candidate)
                        break
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
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
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_no_module_outside_the_emulator_is_over_500_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split by what the code does (docs/architecture.md): {long}"


def test_imports_go_one_way():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    # A package's __init__ importing its own modules is the package, not a circle through it.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") and found[name].name == "__init__.py")}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_daemon_and_the_steps_do_not_branch_on_being_a_cluster():
    branches = []
    for entry in NO_CLUSTER_BRANCHES:
        for path in sorted((PACKAGE / entry).rglob("*.py")) if (PACKAGE / entry).is_dir() else [PACKAGE / entry]:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            chosen = {
                id(inner)
                for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef) and f.name in CHOOSERS
                for inner in ast.walk(f)
            }
            for node in ast.walk(tree):
                if id(node) in chosen:
                    continue
                if isinstance(node, ast.If | ast.IfExp | ast.While) and re.search(
                    r"\b(cluster|shared)\b", ast.unparse(node.test)
                ):
                    branches.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node.test)}")
    assert not branches, "alone or a node is chosen once (membership, coordination, node_strategy): " + str(branches)


def test_no_behaviour_hangs_on_a_free_text_stage():
    found = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in modules().values()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"stage (==|!=)", line)
    ]
    assert not found, f"compare Stage members (Stage.of): {found}"
