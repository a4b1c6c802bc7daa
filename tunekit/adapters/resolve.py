"""Where an adapter reference points: the one resolver behind serve, eval, export, merge and `tunekit adapters`.

A reference is an adapter directory, or a key of the adapter registry: an adapter id (or a unique prefix
of one), its name, or the id of the job that trained it. A reference that names no adapter raises
``AdapterNotFoundError``, whose message says why (no such directory or key, a job without an adapter yet,
a registered directory that is gone) and whose hint names `tunekit adapters list`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import AdapterNotFoundError, ConfigError, JobNotFoundError

if TYPE_CHECKING:
    from ..store import AdapterRecord, JobRecord

# A Hugging Face hub id: NAME or ORG/NAME (letters, digits, - _ .), not starting with '.' or '-'.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
_TUNEKIT_ID = re.compile(r"(tk|ad)-[0-9a-f]{4,}")


@dataclass(frozen=True)
class Located:
    """An adapter found. ``path``: its directory on this machine (None for a managed model, which lives at
    its provider). ``record``: its registry entry (None when it was given as a directory)."""

    path: Path | None
    record: AdapterRecord | None


def registry_entry(key: str) -> AdapterRecord | None:
    """The registry entry with this id, unique id prefix, name or job id; None when there is none."""
    from ..store import default_store

    try:
        return default_store().get_adapter(str(key))
    except AdapterNotFoundError:
        return None


def registered_at(path: str | os.PathLike[str]) -> AdapterRecord | None:
    """The local registry entry whose location is ``path`` (compared resolved); None when there is none."""
    from ..store import default_store

    real = Path(path).expanduser().resolve()
    for record in default_store().list_adapters(backend="local"):
        if Path(record.location).expanduser().resolve() == real:
            return record
    return None


def find_entry(key: str) -> AdapterRecord:
    """The registry entry for ``key``, or AdapterNotFoundError saying why there is none."""
    record = registry_entry(key)
    if record is None:
        raise _not_found(str(key))
    return record


def locate(ref: str | os.PathLike[str]) -> Located:
    """What ``ref`` names: an existing directory, or a registry entry (a local one's directory must exist).

    An existing directory is returned unread: ``read_adapter`` says what is wrong with one that is no adapter.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return Located(path, None)
    record = find_entry(str(ref))
    if record.backend != "local":
        return Located(None, record)
    location = Path(record.location).expanduser()
    if not location.exists():
        raise AdapterNotFoundError(
            f"registry adapter {record.id} points to {location}, which is not on this machine",
            hint="copy the adapter back there or pass the directory it is in now; registered adapters: "
                 "`tunekit adapters list`")
    return Located(location, record)


def resolve_adapter(ref: str | os.PathLike[str]) -> tuple[Path, AdapterRecord | None]:
    """The directory of the adapter ``ref`` names on this machine, and its registry entry (None for a path)."""
    found = locate(ref)
    if found.path is None:  # a managed model: its record names it at the provider
        record = found.record
        raise ConfigError(
            f"registry adapter {record.id} is the {record.backend} model {record.location}, which is not on "
            "this machine", field="adapter",
            hint="managed-backend adapters live at the provider: serve or evaluate it there, or pick a local "
                 "adapter from `tunekit adapters list`")
    return found.path, found.record


def may_name_a_model(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` (serve's BASE, eval's TARGET) may name a model rather than an adapter: an existing
    directory without adapter_config.json, or a hub-id-shaped name that is no registry key. A path, a tunekit
    id or a job id is never a model: ``locate`` says why it names no adapter."""
    path = Path(ref).expanduser()
    if path.exists():
        return not (path / "adapter_config.json").is_file()
    return registry_entry(str(ref)) is None and not _only_an_adapter(str(ref))


def _only_an_adapter(ref: str) -> bool:
    """A path (not hub-id-shaped, or under an existing directory), a tunekit id, or a job in the store."""
    parts = Path(ref).parts
    return (not _HUB_ID.fullmatch(ref) or bool(_TUNEKIT_ID.fullmatch(ref))
            or ("/" in ref and bool(parts) and Path(parts[0]).is_dir()) or _job(ref) is not None)


def _job(ref: str) -> JobRecord | None:
    from ..store import default_store

    try:
        return default_store().get_job(ref)
    except JobNotFoundError:
        return None


def _not_found(ref: str) -> AdapterNotFoundError:
    job = _job(ref)
    if job is None:
        return AdapterNotFoundError(
            f"{ref} does not exist: it is neither an adapter directory nor an adapter in the registry "
            "(id, name or job id)")
    status = job.status.value
    if not job.status.terminal:
        hint = (f"wait for it (`tunekit jobs wait {job.id}`): a job's adapter is registered when it succeeds; "
                "registered adapters: `tunekit adapters list`")
    elif status == "succeeded":
        hint = (f"its entry was removed from the registry: pass the adapter directory (`tunekit jobs status "
                f"{job.id}` shows it), or pick one from `tunekit adapters list`")
    else:
        hint = f"`tunekit jobs status {job.id}` says why it ended; pick a trained one from `tunekit adapters list`"
    return AdapterNotFoundError(f"job {job.id} has no adapter: it is {status}", hint=hint)
