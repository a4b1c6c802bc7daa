"""What a training process reports, written to the store: heartbeats, progress, step metrics, events, and
the cancel request it polls. The worker (one process) and each rank under torchrun (launch.py) use it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ...schemas.job import JobEvent, JobStatus
from ...store import Store
from .process import transition
from .train import TrainCallbacks

HEARTBEAT_S = 2.0
LIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.UNKNOWN)


class CancelledBeforeStart(Exception):
    """A cancel (or SIGTERM) arrived before the first training step."""


class StoreCallbacks(TrainCallbacks):
    """TrainCallbacks that write to the store: the only channel between the worker and everyone else."""

    def __init__(self, store: Store, job_id: str, progress: dict[str, Any]) -> None:
        self.store, self.job_id = store, job_id
        self.progress = dict(progress)
        self.stop_signal = False  # SIGTERM
        self._t0: float | None = None
        self._first_step: int | None = None
        self._lock = threading.Lock()

    def _write(self, **fields: Any) -> None:
        with self._lock:
            self.store.update_job(self.job_id, progress=self.progress, heartbeat_at=time.time(), **fields)

    def event(self, level: str, message: str, type: str = "message", **data: Any) -> None:
        self.store.add_event(self.job_id, JobEvent(created_at=time.time(), level=level, type=type,  # type: ignore[arg-type]
                                                   message=message, data=data))

    # -- TrainCallbacks --------------------------------------------------------------------------------
    def on_start(self, total_steps: int) -> None:
        if self.should_stop():  # cancelled while the model was loading: no step, nothing to checkpoint
            raise CancelledBeforeStart()
        self.progress["total_steps"] = int(total_steps)
        self._t0 = time.monotonic()
        with self._lock:
            self.store.update_job(self.job_id, progress=self.progress, heartbeat_at=time.time())
        # queued -> running; a cancel that arrived while loading stays 'cancelling' (should_stop sees it)
        transition(self.store, self.job_id, JobStatus.RUNNING, (JobStatus.QUEUED, JobStatus.UNKNOWN))
        self.event("info", f"training started: {total_steps} steps", type="start", total_steps=total_steps)

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._first_step is None:  # the first logged step of this session (a resume starts midway)
            self._first_step, self._t0 = step, now
        values = {k: v for k, v in metrics.items() if v is not None}
        self.store.add_metrics(self.job_id, step, values, split="train")
        total = self.progress.get("total_steps") or 0
        done = step - self._first_step
        eta = (now - self._t0) / done * max(total - step, 0) if done > 0 and self._t0 is not None else None
        self.progress.update(step=step, loss=values.get("loss"), lr=values.get("lr"),
                             tokens_per_s=values.get("tokens_per_s"), tokens=values.get("tokens"),
                             epoch=values.get("epoch"), memory_bytes=values.get("memory"), eta_s=eta)
        self._write()

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "eval_loss" in values:  # rows of both splits call their loss "loss" (tables, plots, comparisons)
            values["loss"] = values["eval_loss"]
        self.store.add_metrics(self.job_id, step, values, split="eval")
        if "eval_loss" in values:
            self.progress["eval_loss"] = values["eval_loss"]
            self._write()

    def on_checkpoint(self, step: int, path: str) -> None:
        entry = {"step": step, "path": path}
        ckpts = [c for c in self.progress.get("checkpoints", []) if c.get("step") != step] + [entry]
        self.progress.update(checkpoints=ckpts, last_checkpoint=path)
        self._write()
        self.event("info", f"checkpoint saved at step {step}", type="checkpoint", step=step, path=path)

    def on_event(self, level: str, message: str) -> None:
        self.event(level if level in ("debug", "info", "warning", "error") else "info", message)

    def should_stop(self) -> bool:
        return self.stop_signal or self.store.get_job(self.job_id).status == JobStatus.CANCELLING

    # -- heartbeat thread -------------------------------------------------------------------------------
    def start_heartbeat(self) -> threading.Event:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                try:
                    self.store.update_job(self.job_id, heartbeat_at=time.time())
                except Exception:  # noqa: BLE001 - a busy store must not kill training; next beat retries
                    pass

        threading.Thread(target=beat, name="tunekit-heartbeat", daemon=True).start()
        return done


def one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:500] if first else type(exc).__name__
