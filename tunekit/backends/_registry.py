"""Backend name -> "module:Class", imported on first use (fsspec-style).

A missing optional extra gives the exact ``pip install`` line; third parties register through the
``tunekit.backends`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._exceptions import BackendNotFoundError, MissingDependencyError

if TYPE_CHECKING:
    from .base import Backend

ENTRY_POINT_GROUP = "tunekit.backends"


@dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str                     # "package.module:Class"
    extra: str | None = None        # pip extra that provides the dependencies
    requires: tuple[str, ...] = ()  # importable module names the backend needs


_BUILTIN: dict[str, BackendEntry] = {
    "openai": BackendEntry("openai", "tunekit.backends.openai.backend:OpenAIBackend", "openai", ("openai",)),
    "together": BackendEntry("together", "tunekit.backends.together.backend:TogetherBackend", "together",
                             ("together",)),
    "fireworks": BackendEntry("fireworks", "tunekit.backends.fireworks.backend:FireworksBackend", "fireworks",
                              ("fireworks",)),
    "local": BackendEntry("local", "tunekit.backends.local.backend:LocalBackend", "local",
                          ("torch", "transformers", "peft", "trl")),
}
_extra: dict[str, BackendEntry] = {}


def register_backend(name: str, target: str, *, extra: str | None = None, requires: tuple[str, ...] = ()) -> None:
    """Register a backend by name (used by tests and plugins)."""
    _extra[name] = BackendEntry(name, target, extra, tuple(requires))


def _entry_points() -> dict[str, BackendEntry]:
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = BackendEntry(ep.name, ep.value)
    return found


def _entries() -> dict[str, BackendEntry]:
    return {**_entry_points(), **_BUILTIN, **_extra}


def _missing(entry: BackendEntry) -> list[str]:
    return [mod for mod in entry.requires if importlib.util.find_spec(mod) is None]


def available_backends() -> list[dict[str, Any]]:
    """Every known backend with whether its dependencies are installed."""
    out = []
    for name, entry in sorted(_entries().items()):
        missing = _missing(entry)
        out.append({"name": name, "target": entry.target, "installed": not missing,
                    "install": f"pip install 'tunekit[{entry.extra}]'" if entry.extra else None})
    return out


def get_backend_class(name: str) -> "type[Backend]":
    entries = _entries()
    entry = entries.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, entries, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `tunekit backends`"
        raise BackendNotFoundError(f"unknown backend {name!r}; known: {', '.join(sorted(entries))}", hint=hint)
    missing = _missing(entry)
    if missing:
        raise MissingDependencyError(
            f"backend {name!r} needs {', '.join(missing)}, which is not installed",
            hint=f"pip install 'tunekit[{entry.extra}]'" if entry.extra else f"pip install {' '.join(missing)}")
    module_name, _, cls_name = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if entry.extra and exc.name and not exc.name.startswith("tunekit"):
            raise MissingDependencyError(f"backend {name!r} needs {exc.name}, which is not installed",
                                         hint=f"pip install 'tunekit[{entry.extra}]'") from exc
        raise
    return getattr(module, cls_name)


def get_backend(name: str, **options: Any) -> "Backend":
    return get_backend_class(name)(**options)
