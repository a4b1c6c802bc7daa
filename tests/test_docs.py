"""Every docs/ code block marked `<!-- doctest -->` runs (so the docs stay true)."""

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

BLOCK = re.compile(r"<!-- doctest -->\s*\n```python\n(.*?)```", re.S)
CASES = [(p, i, code) for p in sorted((ROOT / "docs").rglob("*.md"))
         for i, code in enumerate(BLOCK.findall(p.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("path,index,code", CASES, ids=[f"{p.relative_to(ROOT)}#{i}" for p, i, _ in CASES])
def test_doc_example_runs(path: Path, index: int, code: str, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"{path}#{index}", "exec"), {"__name__": "__doc_example__"})
