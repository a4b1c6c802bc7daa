"""The eval package's modules import each other without a circle (type-checking and function-level
imports included): the shared values sit in eval/result.py, below run, record and report."""

from __future__ import annotations

import ast
from pathlib import Path

import tunekit.eval

PACKAGE = Path(tunekit.eval.__file__).parent


def _eval_imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere in it (``from .x import``, ``from . import x``)."""
    siblings = {p.stem for p in PACKAGE.glob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {n.split(".")[0] for n in names if n.split(".")[0] in siblings}
    return out - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_circle_in_the_eval_package():
    graph = {p.stem: _eval_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["result"] <= {"report"} and "result" in graph["run"] and "result" in graph["record"]
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
