"""The local job's process machinery: job directory, per-job lock, status compare-and-set, worker liveness.

Shared by the backend (caller side) and the worker. Light: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..._settings import tunekit_home
from ...schemas.job import JobResult, JobStatus

if TYPE_CHECKING:
    from ...store import JobRecord, Store

WORKER_MODULE = "tunekit.backends.local.worker"
# A worker beats every few seconds from a thread, whatever training is doing. One silent this long is
# stalled (stopped, hung in native code); one on another host (shared TUNEKIT_HOME) counts as gone.
STALE_HEARTBEAT_S = 120.0
# how long a stalled worker gets to exit after SIGTERM before SIGKILL
KILL_GRACE_S = 10.0
# pid -> Popen of workers this process started: poll() tells a live child from a zombie and reaps it.
_CHILDREN: dict[int, subprocess.Popen] = {}



def _store() -> "Store":
    from ...store import default_store

    return default_store()


def job_dir(job_id: str) -> Path:
    return tunekit_home() / "jobs" / job_id


def output_dir(rec: "JobRecord") -> Path:
    opt = ((rec.request or {}).get("options") or {}).get("output_dir")
    return Path(opt) if opt else job_dir(rec.id) / "output"


@contextmanager
def job_lock(job_id: str) -> Iterator[None]:
    """An exclusive per-job lock between processes (released by the OS if the holder dies)."""
    jdir = job_dir(job_id)
    jdir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; the status writes are still single statements
        yield
        return
    with open(jdir / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def transition(store: "Store", job_id: str, to: JobStatus, allowed_from: tuple[JobStatus, ...] | frozenset,
               **fields: Any) -> "JobRecord | None":
    """Set ``status=to`` (and ``fields``) only if the current status is in ``allowed_from``; None if not."""
    with job_lock(job_id):
        if store.get_job(job_id).status not in allowed_from:
            return None
        return store.update_job(job_id, status=to, **fields)


def worker_alive(rec: "JobRecord") -> bool:
    """Is this job's worker process running? (pid reuse and zombies count as gone)."""
    if rec.pid is None:
        return False
    host = (rec.progress or {}).get("host")
    if host and host != socket.gethostname():  # cannot see that pid from here: trust a fresh heartbeat
        return rec.heartbeat_at is not None and time.time() - rec.heartbeat_at < STALE_HEARTBEAT_S
    child = _CHILDREN.get(rec.pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(rec.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user: go on to the zombie check
        pass
    proc = Path(f"/proc/{rec.pid}")
    if proc.is_dir():
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # exited; its parent has not reaped it yet
            cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            return WORKER_MODULE in cmdline and rec.id in cmdline  # else the pid was reused
        except (OSError, IndexError):
            return False
    return True


def stalled_for(rec: "JobRecord", now: float | None = None) -> float | None:
    """Seconds since the last heartbeat of a job still in progress, once that is stale; else None."""
    if rec.status.terminal or rec.heartbeat_at is None:
        return None
    age = (now or time.time()) - rec.heartbeat_at
    return age if age > STALE_HEARTBEAT_S else None


def terminate(rec: "JobRecord") -> str:
    """End a worker that does not answer: SIGTERM (with SIGCONT, so a stopped one receives it), then
    SIGKILL after KILL_GRACE_S. Returns the signal that ended it."""
    def wait_gone(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while worker_alive(rec) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not worker_alive(rec)

    try:
        os.kill(rec.pid, signal.SIGTERM)
        os.kill(rec.pid, signal.SIGCONT)
        if wait_gone(KILL_GRACE_S):
            return "SIGTERM"
        os.kill(rec.pid, signal.SIGKILL)
    except ProcessLookupError:
        return "SIGTERM"
    wait_gone(KILL_GRACE_S)
    return "SIGKILL"


def find_worker_pid(job_id: str) -> int | None:
    """The pid of a running worker for ``job_id`` on this host (Linux /proc), if any. Not one of its ranks
    (``--rank``, started by torchrun under the worker): the worker is the job's process of record."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER_MODULE.encode() in argv and job_id.encode() in argv and b"--rank" not in argv:
            return int(entry.name)
    return None


def _checkpoint_dirs(rec: "JobRecord") -> list[tuple[int, Path]]:
    root = output_dir(rec) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def intact(checkpoint: Path, step: int) -> bool:
    """A checkpoint written to the end: its trainer_state.json (saved after the weights) parses and
    names its step. A save cut short (disk full, kill) leaves it missing or truncated."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step") == step
    except (OSError, ValueError, AttributeError):
        return False


def checkpoints(rec: "JobRecord") -> list[dict[str, Any]]:
    """The job's intact checkpoints on disk, oldest first: [{"step": n, "path": ...}]."""
    return [{"step": step, "path": str(p)} for step, p in _checkpoint_dirs(rec) if intact(p, step)]


def torn_checkpoints(rec: "JobRecord") -> list[Path]:
    """Checkpoint directories whose save did not finish (see ``intact``)."""
    return [p for step, p in _checkpoint_dirs(rec) if not intact(p, step)]


def last_checkpoint(rec: "JobRecord") -> str | None:
    found = checkpoints(rec)
    return found[-1]["path"] if found else None


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception)\b.*: .+")


def last_error(log: Path, tail_bytes: int = 16384) -> str | None:
    """The last exception line a worker wrote to its log (the cause, when it could not reach the store)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, ln in enumerate(lines) if ln.startswith("=== ")]  # each start writes one (backend._spawn)
    lines = lines[starts[-1]:] if starts else lines  # an earlier session's error is not this one's cause
    found = next((ln.strip() for ln in reversed(lines) if _ERROR_LINE.match(ln.strip())), None)
    return found[:300] if found else None


def _partial_result(rec: "JobRecord") -> JobResult:
    """The checkpoints of a job that stopped without an adapter (kept for resume)."""
    base = rec.result or JobResult()
    return base.model_copy(update={"checkpoints": checkpoints(rec)})
