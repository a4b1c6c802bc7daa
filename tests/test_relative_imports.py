"""Every relative import in the package names a module that exists.

A lazy (function-level) import is only run when its branch is, so a module moved to another depth can keep a stale
``from ...x import y`` that no import-time check sees (tunekit/plot.py kept one when it left backends/local/).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import tunekit

PACKAGE = Path(tunekit.__file__).parent


def test_every_relative_import_resolves():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1]  # a module's package; an __init__'s package is its own folder
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            if node.level - 1 >= len(package):
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: above the top-level package")
                continue
            target = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            if importlib.util.find_spec(target) is None:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: no module {target}")
    assert not broken, "\n".join(broken)
