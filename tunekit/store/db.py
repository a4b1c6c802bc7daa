"""SQLite job store shared by every process (caller, CLI, local trainer).

WAL mode so readers never block the trainer's writes; ``BEGIN IMMEDIATE`` for writes and a generous
busy timeout so two writing processes queue instead of failing. The file is created 0600 and holds no
credential: backends read keys from the environment at call time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .._exceptions import AdapterNotFoundError, ConfigError, JobNotFoundError, StaleWriteError, StoreError
from .._secrets import mask, mask_data
from .._settings import state_db_path
from ..schemas.job import JobEvent, JobResult, JobStatus
from .migrations import MIGRATIONS

_JSON_COLUMNS = ("spec", "data", "request", "result", "progress")


@dataclass
class JobRecord:
    id: str
    backend: str
    status: JobStatus
    raw_status: str | None
    remote_id: str | None
    spec: dict[str, Any]
    data: dict[str, Any]
    request: dict[str, Any] | None
    result: JobResult | None
    error: str | None
    progress: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    heartbeat_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> "JobRecord":
        d = dict(row)
        for col in _JSON_COLUMNS:
            d[col] = json.loads(d[col]) if d[col] else None
        d["status"] = JobStatus(d["status"])
        d["result"] = JobResult.model_validate(d["result"]) if d["result"] else None
        d["progress"] = d["progress"] or {}
        return cls(**d)


@dataclass
class AdapterRecord:
    id: str
    name: str | None
    job_id: str | None
    backend: str
    base_model: str | None
    location: str
    data_sha256: str | None
    info: dict[str, Any]
    merge_check: dict[str, Any] | None
    created_at: float

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> "AdapterRecord":
        d = dict(row)
        d["info"] = json.loads(d["info"])
        d["merge_check"] = json.loads(d["merge_check"]) if d["merge_check"] else None
        return cls(**d)


def _status(value: JobStatus | str) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        raise ConfigError(f"{value!r} is not a job status", field="status",
                          hint="use one of: " + ", ".join(s.value for s in JobStatus)) from None


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, default=str)


def new_job_id() -> str:
    return "tk-" + uuid.uuid4().hex[:12]


class Store:
    """Thread-safe handle on the SQLite store. Cheap to create; one connection per instance."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.RLock()
        self.path = Path(path) if path else _default_path()
        home = self.path.parent
        try:
            home.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                _refuse_unusable(self.path)
            else:
                self._create()
            os.chmod(self.path, 0o600)
            self._conn = self._connect(self.path)
            self._migrate()
        except OSError as exc:  # read-only, not a directory, disk full...
            raise _unwritable(home, exc.strerror) from exc
        except sqlite3.Error as exc:
            raise _open_failed(self.path, exc) from exc

    def _create(self) -> None:
        """A new store appears complete or not at all, so an existing empty file always means damage.

        It is built (WAL mode, schema) under a temporary name and linked into place; when another
        process links first, its store is kept and this one is dropped.
        """
        tmp = self.path.with_name(f".{self.path.name}.new-{uuid.uuid4().hex[:8]}")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        try:
            self._conn = self._connect(tmp)
            self._migrate()
            self._conn.close()  # checkpoints: everything is in the main file, no -wal left
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                if not self.path.exists():
                    os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
                leftover.unlink(missing_ok=True)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite's failures (disk full, locked too long) become StoreError here."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                else:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.rollback()
                full = "full" in str(exc)
                raise StoreError(f"cannot write the tunekit store at {self.path}: {exc}",
                                 hint="free disk space there, then retry" if full else
                                 "retry; if it persists, check the file system under TUNEKIT_HOME") from exc

    def _migrate(self) -> None:
        # reading the version needs no write: a store on a full or read-only disk still opens for reading
        if self._conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
            return
        with self._write() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.path} was written by a newer tunekit (schema {version})",
                                 hint="upgrade tunekit: pip install -U tunekit")
            for i in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version={i + 1}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs -------------------------------------------------------------------------------------
    def create_job(self, backend: str, spec: dict[str, Any], data: dict[str, Any], *,
                   request: dict[str, Any] | None = None, job_id: str | None = None,
                   remote_id: str | None = None) -> JobRecord:
        """``remote_id`` for a job that already exists at the provider (an import), in the same write."""
        now = time.time()
        job_id = job_id or new_job_id()
        with self._write() as c:
            c.execute(
                "INSERT INTO jobs (id, backend, status, remote_id, spec, data, request, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, backend, JobStatus.CREATED.value, remote_id, _dump(spec), _dump(data), _dump(request),
                 now, now),
            )
        self.add_event(job_id, JobEvent(created_at=now, type="status", message="job created",
                                        data={"status": "created"}))
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None and len(job_id) >= 4:  # unique prefix, as git does
                rows = self._conn.execute("SELECT * FROM jobs WHERE id LIKE ? LIMIT 2", (job_id + "%",)).fetchall()
                row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in {self.path}", hint="list jobs with `tunekit jobs list`")
        return JobRecord._from_row(row)

    def find_job(self, backend: str, remote_id: str) -> JobRecord | None:
        """The job recorded for ``backend``'s job ``remote_id`` (oldest first if several), else None."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE backend = ? AND remote_id = ?"
                                     " ORDER BY created_at, rowid LIMIT 1", (backend, remote_id)).fetchone()
        return JobRecord._from_row(row) if row is not None else None

    def list_jobs(self, *, backend: str | None = None, status: JobStatus | str | None = None,
                  limit: int | None = 50) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if backend:
            sql += " AND backend = ?"
            args.append(backend)
        if status:
            sql += " AND status = ?"
            args.append(_status(status).value)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return [JobRecord._from_row(r) for r in self._conn.execute(sql, args).fetchall()]

    _UPDATABLE = frozenset({"status", "raw_status", "remote_id", "request", "result", "error", "progress",
                            "pid", "heartbeat_at", "data", "spec"})

    def update_job(self, job_id: str, *, expect_status: JobStatus | str | None = None, **fields: Any) -> JobRecord:
        """Update columns in one transaction; a status change also writes a status event.

        ``expect_status`` makes it a compare-and-set: if another process changed the status since the
        caller read it, nothing is written and :class:`StaleWriteError` is raised (read again, decide again).
        """
        unknown = set(fields) - self._UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        cols, args = [], []
        for key, value in fields.items():
            if key == "status":
                value = JobStatus(value).value
            elif key == "error":
                value = mask(value)  # a provider may echo a credential in its error
            elif key in _JSON_COLUMNS:
                value = _dump(value)
            cols.append(f"{key} = ?")
            args.append(value)
        now = time.time()
        cols.append("updated_at = ?")
        args.append(now)
        with self._write() as c:
            row = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r} in {self.path}", hint="list jobs with `tunekit jobs list`")
            old_status = row["status"]
            if expect_status is not None and old_status != JobStatus(expect_status).value:
                raise StaleWriteError(f"job {job_id} changed to {old_status} meanwhile")
            c.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*args, job_id))
            new_status = fields.get("status")
            if new_status is not None and JobStatus(new_status).value != old_status:
                new = JobStatus(new_status)
                error = mask(fields.get("error"))
                msg = f"status {old_status} -> {new.value}" + (f": {error}" if new == JobStatus.FAILED and error else "")
                data = {"status": new.value, "raw_status": fields.get("raw_status")}
                c.execute("INSERT INTO events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                          (job_id, now, "error" if new == JobStatus.FAILED else "info", "status", msg, _dump(data)))
        return self.get_job(job_id)

    # -- events and metrics -----------------------------------------------------------------------
    def add_event(self, job_id: str, event: JobEvent) -> bool:
        """Append an event; one already stored with the same provider event id is skipped."""
        with self._write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO events (job_id, created_at, level, type, message, data, remote_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, event.created_at, event.level, event.type, mask(event.message),
                 _dump(mask_data(event.data)), event.remote_id),
            )
            return cur.rowcount == 1

    def events(self, job_id: str, *, after: int = 0, limit: int | None = None) -> list[tuple[int, JobEvent]]:
        sql = "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._conn.execute(sql, (job_id, after)).fetchall()
        out = []
        for r in rows:
            out.append((r["seq"], JobEvent(created_at=r["created_at"], level=r["level"], type=r["type"],
                                           message=r["message"], data=json.loads(r["data"]) if r["data"] else {},
                                           remote_id=r["remote_id"])))
        return out

    def add_metrics(self, job_id: str, step: int, values: dict[str, Any], *, split: str = "train") -> None:
        """One row per (split, step): what several reporters give at one step (validation loss, generated
        answers' scores) is merged; a key reported again (a resumed run) takes the new value."""
        with self._write() as c:
            row = c.execute("SELECT values_json FROM metrics WHERE job_id = ? AND split = ? AND step = ?",
                            (job_id, split, int(step))).fetchone()
            merged = {**json.loads(row[0]), **values} if row else values
            c.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)",
                      (job_id, split, int(step), time.time(), json.dumps(merged, default=float)))

    def metrics(self, job_id: str, *, split: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM metrics WHERE job_id = ?", [job_id]
        if split:
            sql += " AND split = ?"
            args.append(split)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY split, step", args).fetchall()
        return [{"split": r["split"], "step": r["step"], **json.loads(r["values_json"])} for r in rows]

    # -- adapter registry -------------------------------------------------------------------------
    def add_adapter(self, *, backend: str, location: str, info: dict[str, Any], job_id: str | None = None,
                    name: str | None = None, base_model: str | None = None, data_sha256: str | None = None,
                    adapter_id: str | None = None) -> AdapterRecord:
        adapter_id = adapter_id or "ad-" + uuid.uuid4().hex[:12]
        with self._write() as c:
            c.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (adapter_id, name, job_id, backend, base_model, location, data_sha256, _dump(info), None,
                       time.time()))
        return self.get_adapter(adapter_id)

    def get_adapter(self, key: str) -> AdapterRecord:
        """By id, name, job id or unique id prefix."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM adapters WHERE id = ? OR name = ? OR job_id = ? ORDER BY created_at DESC LIMIT 1",
                (key, key, key)).fetchone()
            if row is None and len(key) >= 4:
                rows = self._conn.execute("SELECT * FROM adapters WHERE id LIKE ? LIMIT 2", (key + "%",)).fetchall()
                row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise AdapterNotFoundError(f"no adapter {key!r} in the registry", hint="see `tunekit adapters list`")
        return AdapterRecord._from_row(row)

    def list_adapters(self, *, base_model: str | None = None, backend: str | None = None,
                      data_sha256: str | None = None) -> list[AdapterRecord]:
        sql, args = "SELECT * FROM adapters WHERE 1=1", []
        for col, val in (("base_model", base_model), ("backend", backend), ("data_sha256", data_sha256)):
            if val:
                sql += f" AND {col} = ?"
                args.append(val)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_at DESC", args).fetchall()
        return [AdapterRecord._from_row(r) for r in rows]

    def update_adapter(self, adapter_id: str, *, merge_check: dict[str, Any] | None = None,
                       info: dict[str, Any] | None = None, name: str | None = None) -> AdapterRecord:
        current = self.get_adapter(adapter_id)
        with self._write() as c:
            c.execute("UPDATE adapters SET merge_check = ?, info = ?, name = ? WHERE id = ?",
                      (_dump(merge_check) if merge_check is not None else _dump(current.merge_check),
                       _dump({**current.info, **(info or {})}), name if name is not None else current.name,
                       current.id))
        return self.get_adapter(current.id)

    def remove_adapter(self, adapter_id: str) -> None:
        current = self.get_adapter(adapter_id)
        with self._write() as c:
            c.execute("DELETE FROM adapters WHERE id = ?", (current.id,))


# -- a store that cannot be opened: one line naming the file and the next step ------------------------

_SQLITE_HEADER = b"SQLite format 3\x00"


def _refuse_unusable(path: Path) -> None:
    """An existing file must be a SQLite database: an empty one was truncated, not a new store."""
    with open(path, "rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        what = "is empty (0 bytes)" if not header else "is not a SQLite database"
        raise StoreError(f"the tunekit store {path} {what}: it was truncated or overwritten, so its jobs "
                         "cannot be read", hint=_move_aside(path))


def _move_aside(path: Path) -> str:
    return (f"move it aside (`mv {path} {path}.broken`) and tunekit starts a new, empty store there; "
            "restore it from a backup if you have one")


def _default_path() -> Path:
    try:
        return state_db_path()  # creates the tunekit home
    except OSError as exc:
        raise _unwritable(Path(exc.filename or os.environ.get("TUNEKIT_HOME") or "~/.tunekit"), exc.strerror) from exc


def _unwritable(home: Path, reason: str | None) -> StoreError:
    return StoreError(f"cannot write to {home} ({reason or 'read-only'}): the tunekit home, where the job store "
                      "lives, must be a writable directory",
                      hint="make it writable, or point TUNEKIT_HOME at a writable directory "
                           "(e.g. `export TUNEKIT_HOME=$HOME/.tunekit`)")


def _open_failed(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if "readonly" in text or "unable to open" in text:
        return _unwritable(path.parent, text)
    if "not a database" in text or "malformed" in text:
        return StoreError(f"the tunekit store {path} is damaged ({text})", hint=_move_aside(path))
    return StoreError(f"cannot open the tunekit store at {path}: {text}",
                      hint="check TUNEKIT_HOME points to a writable directory")


_default: dict[str, Store] = {}
_default_lock = threading.Lock()


def default_store() -> Store:
    """The store for the current ``TUNEKIT_HOME`` (one per process and path)."""
    path = str(_default_path())
    with _default_lock:
        if path not in _default:
            _default[path] = Store(path)
        return _default[path]
