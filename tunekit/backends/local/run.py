"""The local run as a value: everything the worker trains, decided once.

    plan       LocalBackend.plan -> plan_run(spec, options) -> LocalRun   (the plan's request is its JSON)
    submit     the run gets its job's facts: data snapshot paths + sha256, output_dir; the store keeps it
               in the job's ``request``
    worker     LocalRun.model_validate(record.request) -> check_facts -> train(run, callbacks)

The plan resolves with what it can see (``resolve.resolve_run``). When the worker sees a fact the plan could
not (the base model's config.json now readable, another GPU or memory size), ``check_facts`` resolves again
and says what changed; the worker records that as a ``plan_changed`` event and trains the new run. A resume
from a checkpoint keeps what the checkpoint was trained with (quantization, adapter, batch split, layout, ...)
or refuses to go on. Nothing else resolves: train() reads the run. Importing this module does not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..._exceptions import ConfigError
from ...eval import during_training as _gen_eval
from ...schemas.spec import AdapterConfig, Hyperparameters, TrainingSpec
from .memory import HEADROOM, MemoryEstimate, human_bytes
from .options import LocalOptions, Steps


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantization(_Part):
    requested: Literal["auto", "nf4", "none"]
    mode: Literal["nf4", "none"]
    reason: str

    @property
    def quantized(self) -> bool:
        return self.mode == "nf4"


class Checkpointing(_Part):
    requested: Union[bool, Literal["auto"]]
    enabled: bool  # on (GPU default, or requested); ``layers`` says on how many of them
    layers: Optional[str] = None  # "checkpointed/all" decoder layers
    reason: Optional[str] = None


class Packing(_Part):
    """SFT rows packed into sequences of max_length tokens (TRL's best-fit-decreasing packing, padding-free:
    position ids restart at each row, so each row attends only to itself)."""

    requested: Union[bool, Literal["auto"]]
    enabled: Optional[bool]  # None: 'auto' on SFT, decided by the worker from the tokenized rows
    reason: str


class Training(Hyperparameters):
    """The spec's hyperparameters and what the plan decided from them."""

    micro_batch_size: int
    optimizer: str  # TrainingArguments.optim; "loraplus+<optim>" when LoRA+ builds the optimizer
    dtype: str  # "nf4+bf16" (QLoRA), "bf16" (GPU) or "fp32" (CPU)
    loraplus_lr_ratio: Optional[float] = None
    estimated_total_steps: Optional[int] = None
    checkpointing: Checkpointing
    packing: Optional[Packing] = None  # None: a run stored before the option existed (trained unpacked)
    notes: list[str] = Field(default_factory=list)


class Device(_Part):
    """The device the plan assumed (a fact the worker checks again)."""

    type: Literal["cpu", "cuda"]
    name: Optional[str] = None
    memory_bytes: Optional[int] = None


class Memory(_Part):
    total_bytes: int
    breakdown: dict[str, int]
    fits: Optional[bool]
    budget_bytes: Optional[int]
    suggestions: list[str] = Field(default_factory=list)
    host_bytes: int = 0  # pinned host memory of the activation offload (long context)
    host_memory_bytes: Optional[int] = None

    def estimate(self):
        return MemoryEstimate(self.total_bytes, self.breakdown, self.fits, self.budget_bytes, self.suggestions,
                              host_bytes=self.host_bytes, host_memory_bytes=self.host_memory_bytes)


class RunOptions(LocalOptions):
    """The options with every default filled once (output_dir is the job's, set at submit)."""

    checkpoint_steps: Steps


class DataFile(_Part):
    source: str  # the file validated by finetune
    path: str  # the job's snapshot of it, which the worker checks against sha256 and trains from
    sha256: str
    rows: Optional[int] = None


class RunData(_Part):
    train: DataFile
    validation: Optional[DataFile] = None


class Output(_Part):
    name: Optional[str] = None  # the adapter's name in the registry (spec.suffix)


class LocalRun(_Part):
    """One local training run. ``data`` is None until submit gives the run to a job."""

    base_model: str  # resolved: Hugging Face id, or an absolute directory
    method: Literal["sft", "dpo"]
    adapter: AdapterConfig  # the adapter as asked (variant flags: init, DoRA, rsLoRA, LoRA+)
    lora: dict[str, Any]  # the LoraConfig arguments PEFT gets
    quantization: Quantization
    training: Training
    device: Device
    validation_data: Optional[str] = None
    output: Output = Field(default_factory=Output)
    options: RunOptions
    memory_estimate: Optional[Memory] = None
    estimate_skipped: Optional[str] = None  # why there is no estimate (config.json not readable)
    speed: Optional[dict[str, Any]] = None  # speed.SpeedPlan.to_dict(): speed-ups and per-layer checkpointing
    layout: Optional[dict[str, Any]] = None  # layout.Layout.to_dict() over several ranks; None: one process
    data: Optional[RunData] = None

    def speed_plan(self):
        from .speed import SpeedPlan

        return SpeedPlan(**self.speed) if self.speed is not None else None

    def flat(self) -> dict[str, Any]:
        """Leaf values by dotted path (what plan_changed compares)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def plan_run(spec: TrainingSpec, options: LocalOptions, *, rows: int | None = None,
             data: RunData | None = None) -> LocalRun:
    """Resolve ``spec`` into a run. ``spec.base_model`` is already resolved (catalog name -> id, directory ->
    absolute); ``rows`` (training rows) sizes the checkpoint interval when the run's length is known."""
    from .peft_config import lora_kwargs
    from .resolve import resolve_run

    hp = spec.hyperparameters
    r = resolve_run(spec, device=options.device, gradient_checkpointing=options.gradient_checkpointing,
                    memory_budget_bytes=options.memory_budget_bytes, speedups=options.speedups,
                    packing=options.packing)
    packed, pack_reason = r.packing, r.packing_reason
    rows = data.train.rows if data is not None and data.train.rows else rows
    # packed, a step takes batch_size packed sequences of several rows each: the row count bounds the steps
    most = math.ceil(rows / hp.batch_size) * hp.epochs if rows else None
    total = options.max_steps or (most if packed is False else None)
    ckpt = options.checkpoint_steps or (max(1, math.ceil((total or most) / 10)) if total or most else 50)
    run_options = RunOptions.model_validate({
        **options.model_dump(), "checkpoint_steps": ckpt,
        "eval_steps": options.eval_steps or (ckpt if spec.validation_data else None)})
    from .layout import from_options, more_gpus, optimizer_for

    layout = from_options(spec, r, options.model_dump())  # None: one process
    _gen_eval.check_plan(options.eval_generate, spec.validation_data, layout.world_size if layout else 1,
                         sharded=bool(layout) and layout.kind == "fsdp2")
    est, sp = (layout.estimate if layout is not None and layout.estimate is not None else r.estimate), r.speed
    if layout is None and est is not None and est.fits is False and (more := more_gpus(spec, r)):
        est.suggestions.append(more)
    return LocalRun(
        base_model=str(spec.base_model), method=spec.method, adapter=spec.adapter, lora=lora_kwargs(spec),
        quantization=Quantization(requested=spec.quantization, mode=r.quant.mode, reason=r.quant.reason),
        training=Training(
            **hp.model_dump(), micro_batch_size=r.micro_batch, optimizer=optimizer_for(spec, layout, r.optimizer),
            dtype=r.dtype,
            loraplus_lr_ratio=spec.adapter.loraplus_lr_ratio, estimated_total_steps=total,
            checkpointing=Checkpointing(
                requested="auto" if options.gradient_checkpointing is None else options.gradient_checkpointing,
                enabled=r.gradient_checkpointing,
                layers=f"{sp.checkpointed_layers}/{sp.num_layers}" if sp else None,
                reason=sp.reasons.get("checkpointing") if sp else None),
            packing=Packing(requested=options.packing, enabled=packed, reason=pack_reason),
            notes=sp.notes if sp else []),
        device=Device(type=r.device.type, name=r.device.name, memory_bytes=r.device.total_memory),
        validation_data=spec.validation_data, output=Output(name=spec.suffix), options=run_options,
        memory_estimate=None if est is None else Memory(total_bytes=est.total_bytes, breakdown=est.breakdown,
                                                        fits=est.fits, budget_bytes=r.budget_bytes,
                                                        suggestions=est.suggestions, host_bytes=est.host_bytes,
                                                        host_memory_bytes=est.host_memory_bytes),
        estimate_skipped=r.estimate_skipped, speed=sp.to_dict() if sp else None, data=data,
        layout=layout.to_dict() if layout is not None else None,
    )


def check_facts(run: LocalRun, spec: TrainingSpec, *, checkpoint: str | None = None, job_id: str = "JOB",
                warn: Callable[..., None] | None = None) -> tuple[LocalRun, dict[str, Any]]:
    """The run as it can be resolved on this machine now: ``(run, {})`` when the facts the plan assumed still
    hold, else the re-resolved run and what changed (``{"quantization.mode": [planned, now], ...}``, with
    ``"facts"`` saying which fact moved).

    ``checkpoint``: the worker resumes from it. What the checkpoint was trained with (``_bound``) is then kept
    from the stored run: under ``"kept"`` the changes say which of those a fresh plan would have changed
    (``[recorded, fresh]``). When this machine cannot keep them (too little memory for the recorded
    quantization and micro-batch, fewer GPUs than the recorded layout), a ConfigError names the field, both
    values and the next step. A hub model whose config.json cannot be fetched raises ``resolve.hub_error``'s
    ConfigError (the model could not be loaded either), told first to ``warn(message, type=, error=, hint=)``."""
    from .resolve import device_info, read_config

    dev = device_info(run.options.device)
    now = Device(type=dev.type, name=dev.name, memory_bytes=dev.total_memory)
    try:
        config_known = read_config(run.base_model, fetch=True)[0] is not None  # a hub model's, downloaded now
    except ConfigError as exc:
        if warn is not None:
            said = exc.message.removesuffix("; nothing was trained")
            warn(f"{said}; hint: {exc.hint}", type="hub_error", error=said, hint=exc.hint)
        raise
    moved = {}
    if now != run.device:
        moved["device"] = [run.device.model_dump(), now.model_dump()]
    if config_known != (run.memory_estimate is not None):
        moved["config"] = ["unreadable" if run.memory_estimate is None else "read", "read" if config_known
                           else "unreadable"]
    if not moved:
        return run, {}
    spec = spec.model_copy(update={"base_model": run.base_model})
    new = plan_run(spec, run.options, data=run.data)
    kept: dict[str, list[Any]] = {}
    if checkpoint is not None:
        new, kept = _keep_for_checkpoint(run, spec, new, checkpoint, job_id)
    return new, {"facts": moved, **({"kept": kept} if kept else {}), **_diff(run.flat(), new.flat())}


# What a checkpoint does not depend on: the facts, and what follows from them alone (the memory estimate, which
# kernels run and which layers recompute activations, the compute precision, the reasons shown). Every other
# field made the checkpoint's adapter, optimizer state and data position (quantization, adapter/PEFT config,
# hyperparameters with micro-batch, seed, max_length and packing, the layout's ranks and per-rank batch, the
# options): a resume keeps it. A field added to LocalRun is bound unless named here.
_FREE = ("device", "memory_estimate", "estimate_skipped", "speed", "quantization.reason", "training.checkpointing",
         "training.notes", "training.dtype")
_LAYOUT_BOUND = ("kind", "world_size", "nnodes", "micro_batch", "grad_accum", "quant_storage")
# one optimizer state, two implementations (fused or not, paged or not): the checkpoint's state loads in either
_SAME_STATE = {"adamw_torch_fused": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}


def _bound(run: LocalRun, *, as_state: bool = True) -> dict[str, Any]:
    """The values a checkpoint of ``run`` depends on, by dotted path (the layout as one value); ``as_state``:
    the optimizer by the state it keeps."""
    out = {k: v for k, v in run.flat().items() if not k.startswith("layout")
           and not any(k == p or k.startswith(p + ".") for p in _FREE)}
    if as_state:
        head, plus, name = out["training.optimizer"].rpartition("+")
        out["training.optimizer"] = head + plus + _SAME_STATE.get(name, name)
    out["layout"] = None if run.layout is None else {k: run.layout.get(k) for k in _LAYOUT_BOUND}
    return out


def _differ(before: LocalRun, after: LocalRun) -> dict[str, list[Any]]:
    """The bound fields that differ, with their values as recorded."""
    keys = _diff(_bound(before), _bound(after))
    shown_before, shown_after = _bound(before, as_state=False), _bound(after, as_state=False)
    return {k: [shown_before.get(k), shown_after.get(k)] for k in keys}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def _keep_for_checkpoint(run: LocalRun, spec: TrainingSpec, fresh: LocalRun, checkpoint: str,
                         job_id: str) -> tuple[LocalRun, dict[str, list[Any]]]:
    """``fresh`` when it trains what the checkpoint was trained with; else the stored run's decisions planned
    again on this machine (kept: ``{field: [recorded, fresh]}``), or a ConfigError when they cannot be kept."""
    differ = _differ(run, fresh)
    if not differ:
        return fresh, {}
    try:
        kept = _replan_keeping(run, spec)
    except ConfigError as exc:
        raise _refusal(run, differ, checkpoint, job_id, f"keeping it fails here: {exc}") from exc
    lost = _differ(run, kept)
    if lost:  # e.g. the per-rank micro-batch of the recorded layout does not fit a GPU here
        raise _refusal(run, lost, checkpoint, job_id, "a plan here that keeps the rest cannot keep " + ", ".join(lost))
    est = kept.memory_estimate
    if est is not None and est.fits is False:
        raise _refusal(run, differ, checkpoint, job_id,
                       f"the recorded run needs {human_bytes(est.total_bytes)}, more than {HEADROOM:.0%} of this "
                       f"device's {human_bytes(est.budget_bytes or 0)}")
    return kept, differ


def _replan_keeping(run: LocalRun, spec: TrainingSpec) -> LocalRun:
    """The stored run's bound decisions, planned on this machine (memory, speed-ups, checkpointing anew)."""
    hp = Hyperparameters.model_validate({f: getattr(run.training, f) for f in Hyperparameters.model_fields})
    pinned = spec.model_copy(update={"method": run.method, "adapter": run.adapter, "hyperparameters": hp,
                                     "quantization": run.quantization.mode})
    lay = run.layout or {}
    options = run.options.model_copy(update={
        "gpus": lay.get("gpus", 1), "nnodes": lay.get("nnodes", 1),
        "layout": lay["kind"] if lay.get("kind") in ("ddp", "fsdp2") else "auto"})
    kept = plan_run(pinned, options, data=run.data)
    # as recorded: a run stored before packing was an option has none (it trained unpacked)
    training = kept.training.model_copy(update={"packing": run.training.packing})
    return kept.model_copy(update={"quantization": run.quantization, "lora": run.lora, "options": run.options,
                                   "training": training})


def _refusal(run: LocalRun, fields: dict[str, list[Any]], checkpoint: str, job_id: str, why: str):
    what = "; ".join(f"{k}: recorded {json.dumps(a)}, here {json.dumps(b)}" for k, (a, b) in fields.items())
    where = run.device.name or run.device.type
    if run.device.memory_bytes:
        where += f" with {human_bytes(run.device.memory_bytes)}"
    return ConfigError(
        f"job {job_id} cannot resume from {Path(checkpoint).name} on this machine: {what} (its checkpoint was "
        f"trained with the recorded values), and {why}; nothing was trained", field=next(iter(fields)),
        hint=f"resume on a machine like the one that trained it ({where}), or start again from step 0 here with "
             f"`tunekit finetune --from {job_id} --backend local` (planned for this machine)")


def resolve_base_model(value: str) -> str:
    """A local directory made absolute (the worker runs in the job directory); a catalog name -> its HF id."""
    from ...catalog import resolve_model

    local = Path(value).expanduser()
    if local.is_dir():
        return str(local.resolve())
    return resolve_model(value, "local")


def run_for_files(spec: TrainingSpec, train_path: str | Path, output_dir: str | Path, *,
                  validation_path: str | Path | None = None, **options: Any) -> LocalRun:
    """A run of ``spec`` on data files outside a job (tests, benchmarks, a notebook): trained in place from
    these files (hashed now), into ``output_dir``; ``options`` are provider_options.local keys."""
    from ...adapters.provenance import file_sha256

    def file(path: str | Path) -> DataFile:
        p = Path(path).resolve()
        return DataFile(source=str(p), path=str(p), sha256=file_sha256(p),
                        rows=sum(1 for line in p.open() if line.strip()))

    opts = LocalOptions.model_validate({**options, "output_dir": str(output_dir)})
    data = RunData(train=file(train_path), validation=file(validation_path) if validation_path else None)
    spec = spec.model_copy(update={"base_model": resolve_base_model(spec.base_model),
                                   "validation_data": str(validation_path) if validation_path else None})
    return plan_run(spec, opts, data=data)
