"""FineTuneJob: one handle over a job on any backend, backed by the SQLite store.

Every state change goes through the store, so any process (the caller, the CLI, the local trainer)
sees the same job. Credentials are never part of a job: backends read them at call time.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

from ._exceptions import JobStateError, StoreError, TunekitError
from .schemas.job import JobEvent, JobResult, JobStatus, RemoteState
from .schemas.spec import TrainingSpec
from .store import JobRecord, Store, default_store

if TYPE_CHECKING:
    from .backends.base import Backend


class WaitTimeout(TunekitError, TimeoutError):
    """``wait(timeout=...)`` ran out before the job reached a terminal status."""


class FineTuneJob:
    def __init__(self, record: JobRecord, *, store: Store | None = None, backend: "Backend | None" = None) -> None:
        self._record = record
        self._store = store or default_store()
        self._backend = backend
        # set when the last refresh learned something the store could not take (see apply)
        self.unsaved: str | None = None

    # -- lookup -------------------------------------------------------------------------------------
    @classmethod
    def get(cls, job_id: str, *, store: Store | None = None, **backend_options: Any) -> "FineTuneJob":
        store = store or default_store()
        record = store.get_job(job_id)
        backend = None
        if backend_options:
            from .backends import get_backend

            backend = get_backend(record.backend, **backend_options)
        return cls(record, store=store, backend=backend)

    @property
    def backend(self) -> "Backend":
        if self._backend is None:
            from .backends import get_backend

            self._backend = get_backend(self._record.backend)
        return self._backend

    # -- state --------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._record.id

    @property
    def backend_name(self) -> str:
        return self._record.backend

    @property
    def status(self) -> JobStatus:
        return self._record.status

    @property
    def raw_status(self) -> str | None:
        return self._record.raw_status

    @property
    def remote_id(self) -> str | None:
        return self._record.remote_id

    @property
    def error(self) -> str | None:
        return self._record.error

    @property
    def result(self) -> JobResult | None:
        return self._record.result

    @property
    def progress(self) -> dict[str, Any]:
        return self._record.progress

    @property
    def stalled_for(self) -> float | None:
        """Seconds a local worker has been silent, once its heartbeat is stale (it is shown as stalled)."""
        return _stalled_for(self._record)

    @property
    def spec(self) -> TrainingSpec:
        return TrainingSpec.model_validate(self._record.spec)

    @property
    def record(self) -> JobRecord:
        return self._record

    def __repr__(self) -> str:
        return f"<FineTuneJob {self.id} backend={self.backend_name} status={self.status.value}>"

    # -- lifecycle ----------------------------------------------------------------------------------
    def apply(self, state: RemoteState) -> "FineTuneJob":
        """Write a backend's view of the job into the store (never downgrades a terminal status).

        A compare-and-set on the status: if another process (a local worker, another CLI) changed the
        status since we read it, read again and decide again instead of overwriting its news.
        """
        from .store.db import StaleWriteError

        self.unsaved = None
        try:
            for event in state.events:
                self._store.add_event(self.id, event)
        except StoreError as exc:  # keep answering; the status below is still shown (and not recorded)
            self.unsaved = f"not recorded in the store: {exc}"
        for _ in range(5):
            current = self._store.get_job(self.id)
            fields = self._changes(current, state)
            if not fields:
                self._record = current
                return self
            try:
                self._record = self._store.update_job(self.id, expect_status=current.status, **fields)
            except StaleWriteError:
                continue
            except StoreError as exc:  # a read must still answer when the store cannot be written (disk full)
                self._record = dataclasses.replace(current, **fields)
                self.unsaved = f"not recorded in the store: {exc}"
                return self
            if self._record.status == JobStatus.SUCCEEDED and current.status != JobStatus.SUCCEEDED:
                self._register_result()
            return self
        self._record = self._store.get_job(self.id)
        return self

    @staticmethod
    def _changes(current: JobRecord, state: RemoteState) -> dict[str, Any]:
        if current.status.terminal and state.status != current.status:
            return {}
        fields: dict[str, Any] = {}
        if state.remote_id and state.remote_id != current.remote_id:
            fields["remote_id"] = state.remote_id
        if state.raw_status is not None and state.raw_status != current.raw_status:
            fields["raw_status"] = state.raw_status
        if state.status != current.status:
            fields["status"] = state.status
        if state.error is not None and state.error != current.error:
            fields["error"] = state.error
        if state.result is not None and state.result != current.result:
            fields["result"] = state.result
        if state.progress:
            merged = {**current.progress, **state.progress}
            if merged != current.progress:
                fields["progress"] = merged
        return fields

    def _register_result(self) -> None:
        """Put a managed job's model into the adapter registry (local workers register their own)."""
        result = self._record.result
        if result is None or not result.model or result.registry_id:
            return
        train = (self._record.data or {}).get("train", {})
        entry = self._store.add_adapter(
            backend=self.backend_name, location=result.model, job_id=self.id,
            base_model=self._record.spec.get("base_model"), data_sha256=train.get("sha256"),
            info={"provider_job_id": self.remote_id, "spec": self._record.spec, "data": self._record.data,
                  "metrics": result.metrics},
        )
        result = result.model_copy(update={"registry_id": entry.id})
        self._record = self._store.update_job(self.id, result=result)

    def _record_provider_metrics(self, data: dict[str, Any]) -> None:
        for split, values in _provider_step_metrics(data).items():
            self._store.add_metrics(self.id, int(data["step"]), values, split=split)

    def _store_events(self, events: list[JobEvent]) -> None:
        """Store provider events once each; the newest training-metrics event feeds the progress line."""
        latest: dict[str, Any] = {}
        for event in events:
            if self._store.add_event(self.id, event) and event.type == "metrics":
                progress = _progress_from_metrics(event.data)
                if progress:  # also step metrics, so `tunekit jobs metrics --plot` works for managed jobs
                    latest = progress
                    self._record_provider_metrics(event.data)
        if latest and not self.status.terminal:
            self._record = self._store.update_job(self.id, progress={**self._record.progress, **latest})

    def refresh(self) -> "FineTuneJob":
        """Re-read the store and, unless the job is over, ask the backend."""
        if self._needs_backend():
            self.apply(self.backend.refresh(self._record))
            self._store_events(self.backend.events(self._record))
        return self

    async def refresh_async(self) -> "FineTuneJob":
        """``refresh`` on the backend's async calls."""
        if self._needs_backend():
            self.apply(await self.backend.arefresh(self._record))
            self._store_events(await self.backend.aevents(self._record))
        return self

    def _needs_backend(self) -> bool:
        """Re-read the store: does the job still need asking the backend?"""
        self._record = self._store.get_job(self.id)
        if self.status.terminal:
            return False
        # never reached the provider, or its reply was lost (unknown): see reconcile
        return self._record.remote_id is not None or self._is_local()

    def _check_waitable(self) -> None:
        """A managed job whose submit outcome was lost has nothing to poll until reconcile finds it."""
        if self.status == JobStatus.UNKNOWN and self._record.remote_id is None and not self._is_local():
            raise JobStateError(f"job {self.id}: the submit outcome is unknown (no remote job attached)",
                                hint=f"run `tunekit jobs reconcile {self.id}` to find the remote job")

    def _check_cancellable(self) -> None:
        """Re-read the store. A job already over cannot be cancelled; a managed job with no remote id has
        nothing to cancel yet: its remote job, if any, is found by reconcile."""
        self._record = self._store.get_job(self.id)
        if self.status.terminal:
            raise JobStateError(f"job {self.id} is already {self.status.value}")
        if self._record.remote_id is None and not self._is_local():
            how = "is unknown" if self.status == JobStatus.UNKNOWN else "is not recorded yet"
            raise JobStateError(f"job {self.id}: no remote job is attached (the submit outcome {how}), so there is "
                                "nothing to cancel yet",
                                hint=f"run `tunekit jobs reconcile {self.id}` to find the remote job, then cancel "
                                     "it again")

    def _is_local(self) -> bool:
        return self._record.backend == "local"

    def wait(self, timeout: float | None = None, *, poll_interval: float | None = None,
             progress: bool | None = None) -> "FineTuneJob":
        """Poll with backoff until a terminal status; a progress line on a terminal (stderr)."""
        for pause in self._polls(timeout, poll_interval, progress):
            if pause is None:
                self.refresh()
            else:
                time.sleep(pause)
        return self

    async def wait_async(self, timeout: float | None = None, *, poll_interval: float | None = None,
                         progress: bool | None = None) -> "FineTuneJob":
        """``wait`` for asyncio code, on the backend's async calls."""
        import asyncio

        for pause in self._polls(timeout, poll_interval, progress):
            if pause is None:
                await self.refresh_async()
            else:
                await asyncio.sleep(pause)
        return self

    def _polls(self, timeout: float | None, poll_interval: float | None,
               progress: bool | None) -> Iterator[float | None]:
        """The wait loop, written once: yields None when the job must be refreshed, else seconds to sleep
        (never past the timeout). ``wait`` and ``wait_async`` only differ in how they do those two."""
        first, most = self.backend.poll_interval(self._record)
        delay = poll_interval or first
        deadline = None if timeout is None else time.monotonic() + timeout
        show = sys.stderr.isatty() if progress is None else progress
        while True:
            yield None
            self._check_waitable()
            if show:
                sys.stderr.write("\r\x1b[2K" + progress_line(self._record))
                sys.stderr.flush()
            if self.status.terminal:
                break
            if deadline is not None and time.monotonic() >= deadline:
                if show:
                    sys.stderr.write("\n")
                raise WaitTimeout(f"job {self.id} still {self.status.value} after {timeout:g}s",
                                  hint=f"keep waiting with `tunekit jobs wait {self.id}`")
            yield delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            if poll_interval is None:
                delay = min(most, delay * 1.5)
        if show:
            sys.stderr.write("\n")

    def cancel(self) -> "FineTuneJob":
        self._check_cancellable()
        self.apply(self.backend.cancel(self._record))
        return self

    async def cancel_async(self) -> "FineTuneJob":
        self._check_cancellable()
        self.apply(await self.backend.acancel(self._record))
        return self

    def resume(self) -> "FineTuneJob":
        self._record = self._store.get_job(self.id)
        if self.status in (JobStatus.SUCCEEDED,):
            raise JobStateError(f"job {self.id} already succeeded; nothing to resume")
        self.apply(self.backend.resume(self._record))
        return self

    def events(self, *, after: int = 0, follow: bool = False, poll_interval: float = 2.0) -> Iterator[tuple[int, JobEvent]]:
        """Stored events (synced from the backend first); ``follow`` keeps going until terminal."""
        seq = after
        while True:
            if not self._store.get_job(self.id).status.terminal:
                self.refresh()
            for seq, event in self._store.events(self.id, after=seq):
                yield seq, event
            if not follow or self._store.get_job(self.id).status.terminal:
                for seq, event in self._store.events(self.id, after=seq):
                    yield seq, event
                return
            time.sleep(poll_interval)

    def metrics(self, split: str | None = None) -> list[dict[str, Any]]:
        return self._store.metrics(self.id, split=split)

    @property
    def plan_changes(self) -> list[JobEvent]:
        """``plan_changed`` events: what the worker found different from the plan, and what it changed
        (``data["changes"]``: ``{"field": [planned, now]}``) before training."""
        return [e for _, e in self._store.events(self.id) if e.type == "plan_changed"]

    # -- deployment (local adapters) -------------------------------------------------------------------
    def _adapter_key(self) -> str:
        self._record = self._store.get_job(self.id)
        if self.status != JobStatus.SUCCEEDED or self.result is None:
            raise JobStateError(f"job {self.id} is {self.status.value}: only a succeeded job has an adapter",
                                hint=f"wait for it: `tunekit jobs wait {self.id}`")
        if not self.result.adapter_path:
            raise JobStateError(f"job {self.id} ran on {self.backend_name}: its model {self.result.model} lives "
                                "at the provider", hint="serve it there, or train the same spec with backend='local'")
        return self.result.registry_id or self.result.adapter_path

    def merge(self, out_dir: str, **kwargs: Any) -> Any:
        """Fold this job's adapter into its 16-bit base and check the merge (see ``merge_adapter``)."""
        from .adapters.merge import merge_adapter

        return merge_adapter(self._adapter_key(), out_dir, **kwargs)

    def serve(self, *, name: str | None = None, engine: str | None = None, block: bool = True, **kwargs: Any) -> Any:
        """Serve this job's adapter over its base model on an OpenAI-compatible API (``model=name``)."""
        from .serve import serve

        key = self._adapter_key()
        base = self._store.get_adapter(key).base_model if self.result.registry_id else self.spec.base_model
        return serve(base, {name or self.id: key}, engine=engine, block=block, **kwargs)


def _provider_step_metrics(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """split -> values from a provider metrics event (OpenAI: train_loss, valid_loss, *_mean_token_accuracy)."""
    out: dict[str, dict[str, Any]] = {}
    for split, prefix in (("train", "train_"), ("eval", "valid_")):
        values = {k[len(prefix):]: v for k, v in data.items()
                  if k.startswith(prefix) and isinstance(v, (int, float))}
        if "loss" in values:
            out[split] = values
    return out


def _progress_from_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """step / total_steps / loss from a provider's metrics event (OpenAI: step, total_steps, train_loss)."""
    out: dict[str, Any] = {}
    for key, names in (("step", ("step",)), ("total_steps", ("total_steps",)),
                       ("loss", ("train_loss", "loss"))):
        for name in names:
            if isinstance(data.get(name), (int, float)):
                out[key] = data[name]
                break
    return out if "step" in out else {}


def progress_line(record: JobRecord) -> str:
    """One line: status, step/total, loss, tokens/s, ETA (whatever the backend reported)."""
    p = record.progress or {}
    parts = [f"{record.id} [{record.backend}] {record.status.value}"]
    if record.raw_status and record.raw_status != record.status.value:
        parts[0] += f" ({record.raw_status})"
    step, total = p.get("step"), p.get("total_steps")
    if step is not None and total:
        width = 20
        filled = int(width * min(step / total, 1))
        parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}")
    elif p.get("percent") is not None:
        parts.append(f"{p['percent']:.0f}%")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("tokens_per_s"):
        parts.append(f"{p['tokens_per_s']:.0f} tok/s")
    stalled = _stalled_for(record)
    if stalled is not None:  # an ETA from the last step it took would be a lie
        parts.append(f"stalled: no heartbeat for {format_seconds(stalled)}")
    elif p.get("eta_s") is not None and not record.status.terminal:
        parts.append(f"ETA {format_seconds(p['eta_s'])}")
    return "  ".join(parts)


def _stalled_for(record: JobRecord) -> float | None:
    if record.backend != "local":  # only local workers write heartbeats
        return None
    from .backends.local.process import stalled_for

    return stalled_for(record)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
