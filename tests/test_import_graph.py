"""No import circle anywhere in the ``tunekit`` package, and the managed provider packages' one shape.

Every ``import`` statement counts: module level, inside functions and under ``TYPE_CHECKING`` (a lazy import
still ties two modules together: one cannot be understood, moved or tested without the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunekit

PACKAGE = Path(tunekit.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{module}.{alias.name}"
                found.add(target if target in known else module)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package():
    g = graph()
    assert {"tunekit.api", "tunekit.backends.local.worker", "tunekit.serve.embedded.app"} <= set(g)  # all of it
    assert circles(g) == []


def test_the_circle_finder_finds_circles_through_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from .a import x\n")
    known = {f"pkg.{p.stem}" if p.stem != "__init__" else "pkg": p for p in pkg.glob("*.py")}
    g = {name: imports(name, path, known) for name, path in known.items()}
    assert circles(g) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert circles({**g, "pkg.c": set()}) == []


def test_every_managed_provider_package_has_one_shape():
    from tunekit.backends import get_backend_class

    known = modules()
    for name in ("openai", "together", "fireworks"):
        package = f"tunekit.backends.{name}"
        assert {f"{package}.{m}" for m in ("backend", "mapping", "upload")} <= set(known), name
        # the upload takes a call and a client, never the backend (nor anything that imports it)
        assert f"{package}.backend" not in imports(f"{package}.upload", known[f"{package}.upload"], known)
        cls = get_backend_class(name)
        assert cls.options_model is not None and cls.options_model.model_config["extra"] == "forbid", name
        assert not hasattr(cls, "provider_option_keys"), name


def test_every_relative_import_names_a_tunekit_module():
    """A relative import left unchanged when its module moved fails only when that line runs (a lazy one in
    a plot, say): every ``from .x import y`` must name a module of the package."""
    known = modules()
    wrong = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if node.level > len(parts) or module not in known:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {'.' * node.level}"
                                 f"{node.module or ''}")
    assert wrong == []
