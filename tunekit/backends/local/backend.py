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

import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._exceptions import ConfigError, JobStateError, StoreError
from ..._settings import tunekit_home
from ...job import format_seconds
from ...schemas.job import JobStatus, Plan, RemoteState
from ...schemas.spec import TrainingSpec
from ..base import Backend, PlanContext, Refuse, Rule, Send
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

GiB = 1024**3
# A row still 'created' with no worker this long after creation never got one (the caller died first).
NEVER_STARTED_S = 60.0
# checkpoints kept on disk by default: the newest, and older ones to fall back to if it is torn
KEEP_CHECKPOINTS = 3
# resume waits this long for the previous worker to exit after it wrote its final status
EXIT_WAIT_S = 15.0
ACTIVE = (JobStatus.CREATED, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.UNKNOWN)



# ---------------------------------------------------------------------------------------------------
# provider options: provider_options={"local": {...}}

MAX_STEPS_LIMIT = 10**9  # step counts above this are typos (a billion optimizer steps)
MAX_BUDGET_GB = 2.0**20  # 1 PiB
MAX_GPUS = 1024  # GPUs per node
OPTIONS_HINT = "fix the value in provider_options.local (every option: docs/local.md)"


def _positive_int(name: str):
    def check(value: Any, ctx: PlanContext) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS_LIMIT:
            raise ConfigError(f"provider_options.local.{name} must be an integer in 1..{MAX_STEPS_LIMIT}, "
                              f"not {value!r}", field=f"provider_options.local.{name}", hint=OPTIONS_HINT)
        return value
    return check


def _eval_steps(value: Any, ctx: PlanContext) -> int | float:
    ok = (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STEPS_LIMIT) or (
        isinstance(value, float) and 0 < value < 1)
    if not ok:
        raise ConfigError(f"provider_options.local.eval_steps must be a step count >= 1 or a fraction of the run "
                          f"in (0, 1), not {value!r}", field="provider_options.local.eval_steps", hint=OPTIONS_HINT)
    return value


def _device(value: Any, ctx: PlanContext) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ConfigError(f"provider_options.local.device must be 'cpu', 'cuda' or 'cuda:N', not {value!r}",
                          field="provider_options.local.device", hint=OPTIONS_HINT)
    return value


def _bool(name: str):
    def check(value: Any, ctx: PlanContext) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"provider_options.local.{name} must be true or false, not {value!r}",
                              field=f"provider_options.local.{name}", hint=OPTIONS_HINT)
        return value
    return check


def _path(value: Any, ctx: PlanContext) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("provider_options.local.output_dir must be a directory path",
                          field="provider_options.local.output_dir", hint=OPTIONS_HINT)
    return str(Path(value).expanduser().resolve())


def _budget(value: Any, ctx: PlanContext) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_BUDGET_GB:
        raise ConfigError(f"provider_options.local.memory_budget_gb must be a number of GB in "
                          f"(0, {MAX_BUDGET_GB:.0f}], not {value!r}", field="provider_options.local.memory_budget_gb",
                          hint=OPTIONS_HINT)
    return float(value)


def _gpus(value: Any, ctx: PlanContext) -> int | str:
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_GPUS):
        return value
    raise ConfigError(f"provider_options.local.gpus must be a number of GPUs in 1..{MAX_GPUS} or 'all', "
                      f"not {value!r}", field="provider_options.local.gpus", hint=OPTIONS_HINT)


def _node_rank(value: Any, ctx: PlanContext) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"provider_options.local.node_rank must be an integer >= 0, not {value!r}",
                          field="provider_options.local.node_rank", hint=OPTIONS_HINT)
    return value


def _endpoint(value: Any, ctx: PlanContext) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", value):
        raise ConfigError(f"provider_options.local.rdzv_endpoint must be 'host:port' (node 0's address), "
                          f"not {value!r}", field="provider_options.local.rdzv_endpoint", hint=OPTIONS_HINT)
    return value


def _layout(value: Any, ctx: PlanContext) -> str:
    from .layout import LAYOUTS

    if value not in LAYOUTS:
        raise ConfigError(f"provider_options.local.layout must be one of {', '.join(LAYOUTS)}, not {value!r}",
                          field="provider_options.local.layout", hint=OPTIONS_HINT)
    return value


OPTIONS: dict[str, Any] = {
    "output_dir": _path,                     # default $TUNEKIT_HOME/jobs/<id>/output
    "checkpoint_steps": _positive_int("checkpoint_steps"),  # default ~10 checkpoints per run
    "keep_checkpoints": _positive_int("keep_checkpoints"),  # newest checkpoints kept on disk (default 3)
    "max_steps": _positive_int("max_steps"),  # stop after this many optimizer steps (overrides epochs)
    "eval_steps": _eval_steps,               # validation every N steps (default: checkpoint_steps)
    "device": _device,                       # default: cuda when visible, else cpu
    "gradient_checkpointing": _bool("gradient_checkpointing"),  # default: on for GPU, off for CPU
    "memory_budget_gb": _budget,             # memory the fit check may assume (default: the device's)
    "logging_steps": _positive_int("logging_steps"),
    # several GPUs / nodes (docs/multi-gpu.md): ranks per node, node count, this node's rank, node 0's host:port
    "gpus": _gpus, "nnodes": _positive_int("nnodes"), "node_rank": _node_rank, "rdzv_endpoint": _endpoint,
    "layout": _layout,                       # auto (DDP if a whole model fits a GPU, else FSDP2) | ddp | fsdp2
}


def _dpo_beta(spec: TrainingSpec) -> Rule:
    if spec.method == "dpo":
        return Send("training.dpo_beta")
    return Refuse("dpo_beta applies to method='dpo' only; this spec trains with method='sft'")


def _init(value: Any, ctx: PlanContext) -> Any:
    from .peft_config import INIT_TO_PEFT

    return INIT_TO_PEFT[value]


def _base_model(value: Any, ctx: PlanContext) -> str:
    from ...catalog import resolve_model

    local = Path(value).expanduser()
    if local.is_dir():  # absolute: the worker runs in the job directory
        return str(local.resolve())
    return resolve_model(value, "local")


class LocalBackend(Backend):
    name = "local"
    min_rows = 1
    truncates_at_max_length = True
    provider_option_keys = frozenset(OPTIONS)
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
            key = path.split(".", 2)[2]
            return Send(f"options.{key}", convert=OPTIONS[key], note="local option")
        return rule

    def base_request(self, spec: TrainingSpec, ctx: PlanContext) -> dict[str, Any]:
        """The fully resolved training config, defaults included: what the worker will run."""
        resolved = resolve(spec, rows=ctx.rows)
        ctx.extra["resolved"] = resolved
        return resolved["request"]

    def plan_notes(self, spec: TrainingSpec, ctx: PlanContext) -> list[str]:
        r = ctx.extra.get("resolved") or resolve(spec, rows=ctx.rows)
        notes = [f"quantization: {r['quant'].mode} ({r['quant'].reason})"]
        est = r["estimate"]
        if est is None:
            notes.append(f"memory: no estimate ({r['estimate_skipped']})")
        else:
            verdict = {True: "fits", False: "DOES NOT FIT", None: "device memory unknown"}[est.fits]
            notes.append(f"memory: {est.summary()}: {verdict}")
            if est.fits is False:
                notes += [f"  suggestion: {s}" for s in est.suggestions]
        if r.get("layout") is not None:
            notes.append(f"layout: {r['layout'].summary()}")
        return notes

    # -- lifecycle -----------------------------------------------------------------------------------
    def submit(self, job: "JobRecord", spec: TrainingSpec, plan: Plan) -> RemoteState:
        from .memory import check_fits

        planned = (plan.request or {}).get("memory_estimate") or {}
        if planned.get("fits") is False:  # refuse before spawning anything (re-estimated for the suggestions)
            resolved = resolve(spec, rows=(job.data.get("train") or {}).get("rows"))
            q = resolved["quant"]
            check_fits(resolved["estimate"], what=f"training {resolved['request']['base_model']} ({q.mode}, "
                       f"micro-batch {resolved['request']['training']['micro_batch_size']}, "
                       f"max_length {spec.hyperparameters.max_length})")
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


# ---------------------------------------------------------------------------------------------------
# resolution: spec -> the exact training config (shared by plan, submit and the worker)

def local_options(spec: TrainingSpec) -> dict[str, Any]:
    """The validated provider_options.local (unknown keys are refused by the plan before this runs)."""
    raw = dict((spec.provider_options or {}).get("local") or {})
    ctx = PlanContext(spec=spec)
    return {k: OPTIONS[k](v, ctx) for k, v in raw.items() if k in OPTIONS}


def resolve(spec: TrainingSpec, *, rows: int | None = None) -> dict[str, Any]:
    """Everything the run will use, with defaults: the request the worker runs, built from `resolve_run`
    (the same resolution train() runs: micro-batch, quantization and why, optimizer, memory estimate).
    Reads config.json, never weights."""
    from .peft_config import lora_kwargs
    from .resolve import resolve_run

    opts = local_options(spec)
    hp = spec.hyperparameters
    base = _base_model(spec.base_model, PlanContext(spec=spec))
    budget_gb = opts.get("memory_budget_gb")
    run = resolve_run(spec.model_copy(update={"base_model": base}), device=opts.get("device"),
                      gradient_checkpointing=opts.get("gradient_checkpointing"),
                      memory_budget_bytes=int(budget_gb * GiB) if budget_gb else None)
    from .layout import from_options, more_gpus

    layout = from_options(spec, run, opts)  # None: one process
    quant, dev = run.quant, run.device
    estimate = layout.estimate if layout is not None and layout.estimate is not None else run.estimate
    if layout is None and estimate is not None and estimate.fits is False and (more := more_gpus(spec, run)):
        estimate.suggestions.append(more)
    steps_per_epoch = math.ceil(rows / hp.batch_size) if rows else None
    total = opts.get("max_steps") or (steps_per_epoch * hp.epochs if steps_per_epoch else None)
    ckpt = opts.get("checkpoint_steps") or (max(1, math.ceil(total / 10)) if total else 50)
    # gradient_checkpointing: the user's request (None = auto), so the worker's train() makes the same
    # per-layer choice this plan shows under training.checkpointing (resolve_run is deterministic)
    options = {"output_dir": opts.get("output_dir"), "checkpoint_steps": ckpt,
               "keep_checkpoints": opts.get("keep_checkpoints", KEEP_CHECKPOINTS), "max_steps": opts.get("max_steps"),
               "eval_steps": opts.get("eval_steps") or (ckpt if spec.validation_data else None),
               "device": opts.get("device"), "gradient_checkpointing": opts.get("gradient_checkpointing"),
               "memory_budget_gb": budget_gb, "logging_steps": opts.get("logging_steps", 1),
               **{k: opts[k] for k in ("gpus", "nnodes", "node_rank", "rdzv_endpoint", "layout") if k in opts}}
    request = {
        "base_model": base,
        "method": spec.method,
        "lora": lora_kwargs(spec),
        "quantization": {"requested": spec.quantization, "mode": quant.mode, "reason": quant.reason},
        "training": {
            **hp.model_dump(exclude={"dpo_beta"} if spec.method != "dpo" else set()),
            "micro_batch_size": run.micro_batch, "optimizer": run.optimizer, "dtype": run.dtype,
            "loraplus_lr_ratio": spec.adapter.loraplus_lr_ratio, "estimated_total_steps": total,
            "checkpointing": {
                "requested": opts.get("gradient_checkpointing", "auto"), "enabled": run.gradient_checkpointing,
                "layers": f"{run.speed.checkpointed_layers}/{run.speed.num_layers}" if run.speed else None,
                "reason": run.speed.reasons.get("checkpointing") if run.speed else None,
            },
            **({"notes": run.speed.notes} if run.speed and run.speed.notes else {}),
        },
        "device": {"type": dev.type, "name": dev.name, "memory_bytes": dev.total_memory},
        "validation_data": spec.validation_data,
        "output": {"name": spec.suffix},
        "options": options,
        "layout": None if layout is None else layout.to_dict(),
        "memory_estimate": None if estimate is None else {
            "total_bytes": estimate.total_bytes, "breakdown": estimate.breakdown, "fits": estimate.fits,
            "budget_bytes": run.budget_bytes},
    }
    return {"request": request, "quant": quant, "estimate": estimate, "estimate_skipped": run.estimate_skipped,
            "options": options, "run": run, "layout": layout}
