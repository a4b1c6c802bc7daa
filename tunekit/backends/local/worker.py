"""The local training worker: ``python -m tunekit.backends.local.worker JOB_ID [--resume CHECKPOINT]``.

Started detached by ``LocalBackend.submit``/``resume``. It reads the job from the store, runs
``train()`` and writes everything back to the store: heartbeats (every step, and every few seconds from
a thread so a long first step or model load never looks dead), progress, step metrics, events, and the
final status. A cancel request (status ``cancelling``) or SIGTERM stops it at the next step boundary,
after a checkpoint. Any exception fails the job with a one-line reason; the traceback goes to
``worker.log`` and into an error event.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from ..._exceptions import AdapterNotFoundError, ConfigError, StoreError
from ...schemas.job import JobResult, JobStatus
from ...schemas.spec import TrainingSpec
from ...store import Store, default_store
from .process import checkpoints, job_dir, output_dir, torn_checkpoints, transition
from ...adapters.provenance import file_sha256
from .callbacks import LIVE, CancelledBeforeStart, StoreCallbacks, one_line
from .train import TrainOutcome



def run(job_id: str, *, resume_from: str | None = None, store: Store | None = None) -> int:
    """Run one job to a terminal status; the exit code is 0 on success, 1 on failure or cancel."""
    store = store or default_store()
    record = store.get_job(job_id)
    if record.status.terminal:
        print(f"job {job_id} is already {record.status.value}; nothing to do", flush=True)
        return 1
    cb = StoreCallbacks(store, job_id, record.progress)
    signal.signal(signal.SIGTERM, lambda *_: setattr(cb, "stop_signal", True))
    if record.status == JobStatus.CANCELLING:  # cancelled before the worker got going
        transition(store, job_id, JobStatus.CANCELLED, LIVE, error="cancelled before the first step",
                   result=JobResult(checkpoints=checkpoints(record)))
        return 1
    beat = cb.start_heartbeat()
    try:
        outcome = _train(record, cb, resume_from)
        return _finish(store, store.get_job(job_id), cb, outcome)
    except CancelledBeforeStart:
        transition(store, job_id, JobStatus.CANCELLED, LIVE, error="cancelled before the first step",
                   result=JobResult(checkpoints=checkpoints(store.get_job(job_id))))
        return 1
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the store
        _record_failure(store, job_id, cb, exc)
        return 1
    finally:
        beat.set()


_DISK_FULL = ("No space left on device", "StorageFull", "database or disk is full")


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC, however the library that hit it words it (torch and safetensors wrap the OSError)."""
    while exc is not None:
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or any(m in str(exc) for m in _DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _record_failure(store: Store, job_id: str, cb: StoreCallbacks, exc: BaseException) -> None:
    """Fail the job with its cause. A save cut short by a full disk is removed first: its space is
    what lets the failure be written (if even that fails, the traceback in worker.log is the record
    ``refresh`` reads when it finds this worker gone)."""
    trace = traceback.format_exc()
    try:
        print(trace, file=sys.stderr, flush=True)
    except OSError:
        pass
    torn = discard_torn_checkpoints(store.get_job(job_id))
    record = store.get_job(job_id)
    reason = one_line(exc)
    hint = getattr(exc, "hint", None)
    if _disk_full(exc):
        ckpts = checkpoints(record)
        hint = f"free disk space under {output_dir(record)} (or lower provider_options.local.keep_checkpoints), " + (
            f"then `tunekit jobs resume {job_id}` continues from step {ckpts[-1]['step']}" if ckpts
            else "then start it again with `tunekit finetune`")
    try:
        cb.event("error", f"training failed: {reason}", type="error", traceback=trace[-8000:], removed=torn,
                 **({"hint": hint} if hint else {}))
    except StoreError:  # the status below is what must get through
        pass
    transition(store, job_id, JobStatus.FAILED, LIVE, error=reason + (f" ({hint})" if hint else ""),
               result=JobResult(checkpoints=checkpoints(record)))


def discard_torn_checkpoints(record) -> list[str]:
    """Delete checkpoints whose save was cut short: they cannot be resumed from, and on a full disk
    their space is what lets the failure be recorded."""
    import shutil

    gone = []
    for path in torn_checkpoints(record):
        shutil.rmtree(path, ignore_errors=True)
        gone.append(str(path))
    return gone


def _train(record, cb: StoreCallbacks, resume_from: str | None) -> TrainOutcome:
    """Load the stored run, check the facts it assumed, train it."""
    from pydantic import ValidationError

    from .launch import launch
    from .ranks import launched
    from .run import LocalRun, check_facts
    from .train import train

    for path in discard_torn_checkpoints(record):  # a resume must neither use nor rotate around them
        cb.event("warning", f"removed torn checkpoint {path} (its save did not finish)")
    try:
        run = LocalRun.model_validate(record.request)
    except ValidationError as exc:
        raise ConfigError(f"job {record.id} holds no local run this tunekit can train ({exc.error_count()} "
                          f"problem(s), e.g. {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})", field="request",
                          hint=f"start it again with `tunekit finetune --from {record.id} --backend local`") from None
    if run.data is None:
        raise ConfigError(f"job {record.id}'s run has no data (it was planned, not submitted)", field="data",
                          hint="start jobs with `tunekit finetune`")
    data_snapshot(run.data.train, "train")
    if run.data.validation is not None:
        data_snapshot(run.data.validation, "validation")
    # a resume keeps what its checkpoint was trained with, or fails here saying why (run.check_facts)
    run, changes = check_facts(run, TrainingSpec.model_validate(record.spec), checkpoint=resume_from, job_id=record.id,
                               warn=lambda message, **data: cb.event("warning", message, **data))
    if changes:
        cb.store.update_job(record.id, request=run.model_dump(mode="json"))
        cb.event("warning", plan_changed_message(changes), type="plan_changed", changes=changes)
    if launched(run.layout):  # ranks under torchrun (launch.py; FSDP2 on one GPU too), each training this run
        return launch(record, cb, run, resume_from)
    return train(run, cb, resume_from_checkpoint=resume_from)


# the decisions a reader looks for first in a plan_changed message (every change is in the event's data)
_FIRST = ("quantization.", "training.", "device.", "memory_estimate.total_bytes", "memory_estimate.fits",
          "speed.checkpointed_layers")


def plan_changed_message(changes: dict[str, list[Any]], shown: int = 6) -> str:
    facts = changes.get("facts") or {}
    why = ", ".join(f"{k}: {_short(v[0])} -> {_short(v[1])}" for k, v in facts.items())
    rest = sorted(((k, v) for k, v in changes.items() if k not in ("facts", "kept")),
                  key=lambda kv: next((i for i, p in enumerate(_FIRST) if kv[0].startswith(p)), len(_FIRST)))
    diff = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in rest[:shown])
    more = f" (+{len(rest) - shown} more)" if len(rest) > shown else ""
    kept = "; ".join(f"{k}: {_short(a)} (a fresh plan: {_short(b)})"
                     for k, (a, b) in (changes.get("kept") or {}).items())
    return f"plan changed ({why}): {diff or 'no decision changed'}{more}" + (
        f"; kept for the checkpoint: {kept}" if kept else "")


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else __import__("json").dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_DATA_FIELD = {"train": ("training file", "data"), "validation": ("validation file", "validation_data")}


def data_snapshot(file, split: str) -> Path:
    """The job's own copy of a data file (``run.data.<split>``), proven to be the bytes validated at submit:
    what it trains from.

    Made on the first start (copy and hash in one read, so no later edit can slip in between) and
    checked again on every resume; a file changed after ``finetune`` returned fails the job here.
    """
    what, field = _DATA_FIELD[split]
    dest = Path(file.path)
    expected = file.sha256
    if not expected:
        raise ConfigError(f"the job records no validated sha256 for its {what} {file.source}; nothing was "
                          f"trained", field=field, hint="start it with `tunekit finetune`, which validates the data")
    if dest.is_file():
        source, digest = dest, file_sha256(dest)
    else:
        source = Path(file.source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(part, "wb") as out:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
        except FileNotFoundError as exc:
            raise ConfigError(f"the {what} {source} is gone; nothing was trained", field=field,
                              hint="start a new job with `tunekit finetune` on the file's new location") from exc
        digest = h.hexdigest()
        if digest == expected:
            os.replace(part, dest)
        else:
            part.unlink()
    if digest != expected:
        raise ConfigError(
            f"the {what} {source} changed after it was validated (sha256 {digest[:12]}, validated "
            f"{expected[:12]}); nothing was trained", field=field,
            hint="a job trains exactly the data that was validated: start a new job with `tunekit finetune` "
                 "to validate and train the new content")
    return dest


def _finish(store: Store, record, cb: StoreCallbacks, outcome: TrainOutcome) -> int:
    ckpts = checkpoints(record)
    metrics = {k: v for k, v in outcome.metrics.items() if v is not None}
    cb.progress.update(checkpoints=ckpts, last_checkpoint=outcome.last_checkpoint, eta_s=0)
    if outcome.stopped or outcome.adapter_path is None:
        why = "cancel requested" if record.status == JobStatus.CANCELLING else "stopped by SIGTERM"
        cb._write()
        transition(store, record.id, JobStatus.CANCELLED, LIVE,
                   error=f"{why}; stopped at step {metrics.get('steps')} with checkpoint {outcome.last_checkpoint}",
                   result=JobResult(metrics=metrics, checkpoints=ckpts))
        return 1
    adapter = _register(store, record, outcome, metrics)
    cb.progress.update(step=metrics.get("steps", cb.progress.get("step")))
    cb._write()
    result = JobResult(model=outcome.adapter_path, adapter_path=outcome.adapter_path, metrics=metrics,
                       checkpoints=ckpts, registry_id=adapter.id)
    done = transition(store, record.id, JobStatus.SUCCEEDED, LIVE, result=result, error=None)
    if done is None:  # someone settled the job meanwhile (e.g. a refresh from another host): say so
        cb.event("warning", f"training finished but the job was already {store.get_job(record.id).status.value}; "
                            f"adapter {adapter.id} at {outcome.adapter_path}")
        return 1
    cb.event("info", f"adapter {adapter.id} registered: {outcome.adapter_path}", type="result",
             registry_id=adapter.id, adapter_path=outcome.adapter_path)
    return 0


def _register(store: Store, record, outcome: TrainOutcome, metrics: dict[str, Any]):
    from ...adapters.provenance import build_info, register

    request = record.request or {}
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(outcome.adapter_path)
    except Exception:  # noqa: BLE001 - hashes of the tokenizer are optional provenance
        pass
    config = {
        "lora": outcome.lora_config, "quantization": outcome.quantization, "optimizer": outcome.optimizer,
        "micro_batch": outcome.micro_batch, "gradient_accumulation_steps": outcome.grad_accum,
        "gradient_checkpointing": outcome.gradient_checkpointing, "device": outcome.device, "dtype": outcome.dtype,
        "masking": outcome.masking, "method": record.spec.get("method", "sft"),
        "training": request.get("training"), "options": request.get("options"),
    }
    extra = {
        "adapter_dir": outcome.adapter_path, "examples": outcome.examples, "truncated": outcome.truncated_count,
        "no_loss": outcome.no_loss_count, "resumed_from": outcome.resumed_from,
        "memory_estimate": outcome.memory_estimate, "trainer": outcome.extra,
        "tokenizer_json_sha256": outcome.tokenizer_sha256,
        "base_model_commit": outcome.base_model_revision,
    }
    info = build_info(record, base_model_id=request.get("base_model") or record.spec["base_model"],
                      resolved_config=config, metrics=metrics, tokenizer=tokenizer, extra=extra)
    name = record.spec.get("suffix")
    if name:
        try:
            store.get_adapter(name)
            name = f"{name}-{record.id.removeprefix('tk-')[:6]}"  # names are unique in the registry
        except AdapterNotFoundError:  # the name is free
            pass
    return register(store, record, outcome.adapter_path, info, name=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunekit.backends.local.worker")
    parser.add_argument("job_id")
    parser.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    parser.add_argument("--rank", action="store_true", help="one rank under torchrun (launch.py), not the job's worker")
    args = parser.parse_args(argv)
    if args.rank:
        from torch.distributed.elastic.multiprocessing.errors import record

        from .launch import run_rank

        return record(run_rank)(args.job_id, args.resume)
    print(f"tunekit worker for {args.job_id} (pid {__import__('os').getpid()}); job dir {job_dir(args.job_id)}",
          flush=True)
    return run(args.job_id, resume_from=args.resume)


if __name__ == "__main__":
    sys.exit(main())
