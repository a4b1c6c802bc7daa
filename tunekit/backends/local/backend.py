"""The local backend: plan a LoRA/QLoRA run, then train it in a detached worker process.

The caller, the CLI and the trainer are separate processes that share only the store: ``submit``
spawns ``python -m tunekit.backends.local.worker JOB_ID`` in its own session (so the caller may exit),
the worker writes heartbeats, progress, metrics and events, and every other call reads the store.

    $TUNEKIT_HOME/jobs/<id>/worker.log        the worker's stdout/stderr (tracebacks land here)
    $TUNEKIT_HOME/jobs/<id>/data/             the job's copy of its data, checked against the validated sha256
    $TUNEKIT_HOME/jobs/<id>/output/           checkpoints/checkpoint-<step>/, adapter/ (see train.py)

Status changes that two processes may race on (cancel against the worker finishing, a refresh that
finds the worker gone) go through ``transition``: a compare-and-set under a per-job file lock.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._exceptions import JobStateError, StoreError
from ..._settings import tunekit_home
from ...job import format_seconds
from ...schemas.job import JobStatus, Plan, RemoteState
from ...schemas.spec import TrainingSpec
from ..base import Backend, PlanContext, Refuse, Rule, Send
from .options import LocalOptions
from .run import resolve_base_model
from .process import (
    _CHILDREN,
    WORKER_MODULE,
    _partial_result,
    _store,
    find_worker_pid,
    job_dir,
    job_lock,
    last_checkpoint,
    last_error,
    stalled_for,
    terminate,
    transition,
    worker_alive,
)

if TYPE_CHECKING:
    from ...store import JobRecord, Store

# A row still 'created' with no worker this long after creation never got one (the caller died first).
NEVER_STARTED_S = 60.0
# resume waits this long for the previous worker to exit after it wrote its final status
EXIT_WAIT_S = 15.0
ACTIVE = (JobStatus.CREATED, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.UNKNOWN)



def _dpo_beta(spec: TrainingSpec) -> Rule:
    if spec.method == "dpo":
        return Send("training.dpo_beta")
    return Refuse("dpo_beta applies to method='dpo' only; this spec trains with method='sft'")


def _init(value: Any, ctx: PlanContext) -> Any:
    from .variants import INITS

    return INITS[value].peft


def _base_model(value: Any, ctx: PlanContext) -> str:
    return ctx.extra["run"].base_model  # resolved once, by base_request


class LocalBackend(Backend):
    name = "local"
    min_rows = 1
    truncates_at_max_length = True
    options_model = LocalOptions
    options_doc = "docs/local.md"
    field_map = {
        "base_model": Send("base_model", convert=_base_model, note="canonical names -> Hugging Face id; "
                           "local directories pass through"),
        "method": Send("method"),
        "hyperparameters.epochs": Send("training.epochs"),
        "hyperparameters.batch_size": Send("training.batch_size",
                                           note="global batch = micro_batch x gradient_accumulation_steps"),
        "hyperparameters.learning_rate": Send("training.learning_rate"),
        "hyperparameters.warmup_ratio": Send("training.warmup_ratio"),
        "hyperparameters.lr_scheduler": Send("training.lr_scheduler"),
        "hyperparameters.weight_decay": Send("training.weight_decay"),
        "hyperparameters.max_grad_norm": Send("training.max_grad_norm"),
        "hyperparameters.gradient_accumulation_steps": Send("training.gradient_accumulation_steps"),
        "hyperparameters.max_length": Send("training.max_length", note="longer examples are truncated and counted"),
        "hyperparameters.seed": Send("training.seed"),
        "hyperparameters.dpo_beta": _dpo_beta,
        "adapter.r": Send("lora.r"),
        "adapter.alpha": Send("lora.lora_alpha"),
        "adapter.dropout": Send("lora.lora_dropout"),
        "adapter.target_modules": Send("lora.target_modules"),
        "adapter.use_dora": Send("lora.use_dora"),
        "adapter.use_rslora": Send("lora.use_rslora"),
        "adapter.init": Send("lora.init_lora_weights", convert=_init, note="PEFT init_lora_weights value"),
        "adapter.loraplus_lr_ratio": Send("training.loraplus_lr_ratio",
                                          note="LoRA+ optimizer (peft.optimizers.create_loraplus_optimizer)"),
        "quantization": Send("quantization.requested", note="the resolved mode and why: request.quantization"),
        "validation_data": Send("validation_data", note="validation loss every eval_steps and at the end"),
        "suffix": Send("output.name", note="the adapter's name in the registry"),
    }

    # -- planning ------------------------------------------------------------------------------------
    def _rule_for(self, path: str, spec: TrainingSpec) -> Rule:
        rule = super()._rule_for(path, spec)
        if path.startswith("provider_options.local.") and isinstance(rule, Send):
            return Send(f"options.{path.split('.', 2)[2]}", convert=rule.convert, note="local option")
        return rule

    def base_request(self, spec: TrainingSpec, ctx: PlanContext) -> dict[str, Any]:
        """The run, resolved once with every default (run.LocalRun): what the worker will train."""
        from .run import plan_run

        resolved = spec.model_copy(update={"base_model": resolve_base_model(spec.base_model)})
        run = plan_run(resolved, self.provider_options(spec), rows=ctx.rows)
        ctx.extra["run"] = run
        return run.model_dump(mode="json")

    def plan_notes(self, spec: TrainingSpec, ctx: PlanContext) -> list[str]:
        run = ctx.extra["run"]
        notes = [f"quantization: {run.quantization.mode} ({run.quantization.reason})"]
        if (pk := run.training.packing) is not None:
            notes.append(f"packing: {'auto' if pk.enabled is None else 'on' if pk.enabled else 'off'} ({pk.reason})")
        est = run.memory_estimate
        if est is None:
            notes.append(f"memory: no estimate ({run.estimate_skipped})")
        else:
            verdict = {True: "fits", False: "DOES NOT FIT", None: "device memory unknown"}[est.fits]
            notes.append(f"memory: {est.estimate().summary()}: {verdict}")
            if est.fits is False:
                notes += [f"  suggestion: {s}" for s in est.suggestions]
        if run.layout is not None:
            from .layout import Layout

            notes.append(f"layout: {Layout.from_dict(run.layout).summary()}")
        return notes

    # -- lifecycle -----------------------------------------------------------------------------------
    def submit(self, job: "JobRecord", spec: TrainingSpec, plan: Plan) -> RemoteState:
        """Give the planned run its job's data snapshot and output directory, store it, start the worker."""
        from .memory import check_fits
        from .run import DataFile, LocalRun, RunData

        run = LocalRun.model_validate(plan.request)
        if run.memory_estimate is not None:  # refuse before spawning anything
            check_fits(run.memory_estimate.estimate(), what=f"training {run.base_model} ({run.quantization.mode}, "
                       f"micro-batch {run.training.micro_batch_size}, max_length {run.training.max_length})")
        jdir = job_dir(job.id)

        def snapshot(split: str) -> DataFile | None:
            entry = job.data.get(split)
            if not entry:
                return None
            return DataFile(source=entry["path"], path=str(jdir / "data" / f"{split}.jsonl"),
                            sha256=entry.get("sha256") or "", rows=entry.get("rows"))

        data = RunData(train=snapshot("train"), validation=snapshot("validation"))
        options = run.options.model_copy(update={"output_dir": run.options.output_dir or str(jdir / "output")})
        run = run.model_copy(update={"data": data, "options": options})
        _store().update_job(job.id, request=run.model_dump(mode="json"))
        return self._spawn(job, resume_from=None)

    def refresh(self, job: "JobRecord") -> RemoteState:
        store = _store()
        rec = store.get_job(job.id)
        if not rec.status.terminal and not worker_alive(rec):
            try:
                rec = self._settle_dead_worker(store, rec)
            except StoreError:  # cannot be recorded now (disk full): still say what happened
                status, error = self._dead_worker_verdict(rec)
                return RemoteState(remote_id=rec.remote_id, status=status, error=error)
        # Echo only the status: progress, result and error are already in the store (written by the
        # worker), and echoing them back would race with its next write.
        return RemoteState(remote_id=rec.remote_id, status=store.get_job(job.id).status)

    def _dead_worker_verdict(self, rec: "JobRecord") -> tuple[JobStatus, str | None]:
        """What a job whose worker is gone has become, and why (None: it is still being submitted)."""
        now = time.time()
        if rec.pid is None:
            if rec.status == JobStatus.CREATED and now - rec.created_at < NEVER_STARTED_S:
                return rec.status, None
            return JobStatus.FAILED, "the worker was never started (the submitting process stopped first)"
        ago = f"{now - rec.heartbeat_at:.0f}s ago" if rec.heartbeat_at else "never"
        if rec.status == JobStatus.CANCELLING:
            return JobStatus.CANCELLED, (f"worker process {rec.pid} exited before confirming the cancel "
                                         f"(last heartbeat {ago})")
        cause = last_error(job_dir(rec.id) / "worker.log")
        return JobStatus.FAILED, (f"worker process {rec.pid} vanished (last heartbeat {ago})"
                                  + (f"; its last error: {cause}" if cause else "")
                                  + f"; resume with `tunekit jobs resume {rec.id}`")

    def _settle_dead_worker(self, store: "Store", rec: "JobRecord") -> "JobRecord":
        status, reason = self._dead_worker_verdict(rec)
        if reason is None:
            return rec
        result = _partial_result(rec) if status == JobStatus.FAILED and rec.pid is not None else None
        return transition(store, rec.id, status, ACTIVE, error=reason,
                          **({"result": result} if result else {})) or rec

    def cancel(self, job: "JobRecord") -> RemoteState:
        store = _store()
        rec = store.get_job(job.id)
        if rec.status.terminal:
            raise JobStateError(f"job {rec.id} is already {rec.status.value}")
        stalled = stalled_for(rec)
        if worker_alive(rec) and stalled is None:
            # The worker polls for this at every step, saves a checkpoint there and marks itself cancelled.
            rec = transition(store, rec.id, JobStatus.CANCELLING, (JobStatus.QUEUED, JobStatus.RUNNING,
                                                                 JobStatus.UNKNOWN, JobStatus.CREATED)) or rec
        elif worker_alive(rec):  # stalled: it cannot see the request, so it is ended (it may still save)
            transition(store, rec.id, JobStatus.CANCELLING, ACTIVE)
            how = terminate(rec)
            rec = transition(store, rec.id, JobStatus.CANCELLED, ACTIVE, result=_partial_result(rec),
                             error=f"worker process {rec.pid} was stalled (no heartbeat for "
                                   f"{format_seconds(stalled)}); ended with {how}") or rec
        else:
            rec = transition(store, rec.id, JobStatus.CANCELLED, ACTIVE, result=_partial_result(rec)) or rec
        return RemoteState(remote_id=rec.remote_id, status=store.get_job(job.id).status)

    def resume(self, job: "JobRecord") -> RemoteState:
        store = _store()
        rec = store.get_job(job.id)
        if rec.status not in (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.UNKNOWN):
            if worker_alive(rec):
                stalled = stalled_for(rec)
                state = (f"is stalled (no heartbeat for {format_seconds(stalled)})" if stalled is not None
                         else "is running")
                raise JobStateError(f"job {rec.id} is {rec.status.value}: its worker (pid {rec.pid}) {state}",
                                    hint=f"cancel it first with `tunekit jobs cancel {rec.id}` (a stalled worker "
                                         f"is ended), then resume")
            if rec.status != JobStatus.UNKNOWN:
                rec = self._settle_dead_worker(store, rec)
            if rec.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise JobStateError(f"job {rec.id} is {rec.status.value}; only failed, cancelled or unknown "
                                    f"jobs can be resumed")
        deadline = time.monotonic() + EXIT_WAIT_S
        while worker_alive(rec) and time.monotonic() < deadline:  # the last worker may still be exiting
            time.sleep(0.1)
        if worker_alive(rec):
            raise JobStateError(f"job {rec.id} is {rec.status.value} but its worker (pid {rec.pid}) is still running",
                                hint=f"wait for it to exit (or kill {rec.pid}), then resume")
        ckpt = last_checkpoint(rec)
        if ckpt is None:
            raise JobStateError(
                f"job {rec.id} has no checkpoint to resume from",
                hint="start it again with `tunekit finetune` (set provider_options.local.checkpoint_steps "
                     "to checkpoint more often)")
        return self._spawn(rec, resume_from=ckpt)

    def find_remote(self, job: "JobRecord") -> RemoteState | None:
        """A worker of this job running without its pid recorded (the submitter died right after spawning)."""
        pid = find_worker_pid(job.id)
        if pid is None:
            return None
        store = _store()
        with job_lock(job.id):
            rec = store.update_job(job.id, pid=pid, heartbeat_at=time.time(), remote_id=str(job_dir(job.id)),
                                   progress={**store.get_job(job.id).progress, "host": socket.gethostname()})
        status = rec.status if rec.status not in (JobStatus.CREATED, JobStatus.UNKNOWN) else JobStatus.QUEUED
        return RemoteState(remote_id=rec.remote_id, status=status)

    def poll_interval(self, job: "JobRecord") -> tuple[float, float]:
        return (0.5, 5.0)

    # -- the worker process --------------------------------------------------------------------------
    def _spawn(self, job: "JobRecord", *, resume_from: str | None) -> RemoteState:
        store = _store()
        jdir = job_dir(job.id)
        jdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", WORKER_MODULE, job.id]
        if resume_from:
            cmd += ["--resume", resume_from]
        env = dict(os.environ)
        env["TUNEKIT_HOME"] = str(tunekit_home())
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        pkg_root = str(Path(__file__).resolve().parents[3])  # so the worker imports this very tunekit
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        allowed = (JobStatus.CREATED,) if resume_from is None else (JobStatus.FAILED, JobStatus.CANCELLED,
                                                                      JobStatus.UNKNOWN)
        with job_lock(job.id):
            current = store.get_job(job.id)
            if current.status not in allowed:
                raise JobStateError(f"job {job.id} is {current.status.value}; not starting a worker")
            with open(jdir / "worker.log", "ab") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, cwd=str(jdir), start_new_session=True, close_fds=True)
            _CHILDREN[proc.pid] = proc
            progress = {**current.progress, "host": socket.gethostname()}
            if resume_from:
                progress["resumed_from"] = resume_from
            # queued until the worker has loaded the model and calls on_start (then: running)
            rec = store.update_job(job.id, status=JobStatus.QUEUED, pid=proc.pid, heartbeat_at=time.time(),
                                   remote_id=str(jdir), progress=progress, error=None)
        return RemoteState(remote_id=rec.remote_id, status=rec.status)
