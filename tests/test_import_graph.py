"""No import circles through the public API, the retry policy or the managed backends.

Every ``import`` statement counts, also the ones inside functions (a lazy import still ties two modules
together: one cannot be understood, moved or tested without the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunekit

PACKAGE = Path(tunekit.__file__).parent
# The modules whose circles this test forbids (other areas are checked by their own tests).
CHECKED = ("tunekit.api", "tunekit._retry", "tunekit._settings", "tunekit.data", "tunekit.backends._managed",
           "tunekit.backends._registry", "tunekit.backends.base", "tunekit.backends.openai",
           "tunekit.backends.together", "tunekit.backends.fireworks")


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


def circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
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


def test_no_import_circle_through_the_api_or_the_managed_backends():
    mine = [c for c in circles() if any(m == p or m.startswith(p + ".") for m in c for p in CHECKED)]
    assert mine == []


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
