"""The eval package's shared values sit in eval/result.py, below run, record and report (type-checking and
function-level imports included; circles anywhere in tunekit: tests/test_import_graph.py)."""

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


def test_the_shared_values_sit_below_run_and_record():
    # (no circle anywhere in tunekit: tests/test_import_graph.py)
    graph = {p.stem: _eval_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["result"] <= {"report"} and "result" in graph["run"] and "result" in graph["record"]
