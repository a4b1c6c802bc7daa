"""The local training core: one plain function, `train()`, over TRL + PEFT + bitsandbytes.

The worker process (worker.py) loads the job's stored run (run.py) and calls `train(run, callbacks)`,
turning `TrainCallbacks` calls into store rows; nothing here knows about the store or resolves anything.
Output layout under ``run.options.output_dir``:

    checkpoints/checkpoint-<step>/   HF Trainer checkpoints (adapter, optimizer, scheduler, RNG, data position)
    adapter/                         the final PEFT adapter (adapter_model.safetensors + adapter_config.json)
                                     and the tokenizer; PiSSA/OLoRA adapters are converted to plain LoRA
    init_adapter/                    PiSSA/OLoRA only: the adapter at initialisation, kept for that conversion
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._exceptions import ConfigError, TrainingError
from ...eval import during_training as _gen_eval
from . import memory as _memory
from ...adapters import provenance as _provenance
from . import kernels as _kernels
from . import ranks as _ranks
from . import variants as _variants
from . import varlen as _varlen
from .datasets import PreparedData, prepare
from .peft_config import DeviceInfo, peft_error_to_config_error

if TYPE_CHECKING:
    from .run import LocalRun


class TrainCallbacks:
    """Hooks the trainer calls; every one is optional (no-op defaults). Override what you need."""

    def on_start(self, total_steps: int) -> None: ...

    def on_step(self, step: int, metrics: dict[str, Any]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, step: int, path: str) -> None: ...

    def on_event(self, level: str, message: str) -> None: ...

    def should_stop(self) -> bool:
        """Polled at every optimizer step; True stops cleanly there (a checkpoint is saved first)."""
        return False


@dataclass
class TrainOutcome:
    adapter_path: str | None
    metrics: dict[str, Any]
    truncated_count: int
    no_loss_count: int
    examples: int
    stopped: bool
    last_checkpoint: str | None
    resumed_from: str | None
    lora_config: dict[str, Any]
    quantization: dict[str, str]
    optimizer: str
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    device: str
    dtype: str
    masking: str | None
    memory_estimate: dict[str, Any]
    versions: dict[str, str]
    tokenizer_sha256: str | None
    chat_template_sha256: str | None
    base_model_revision: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def _load_config(base_model: str) -> Any:
    from transformers import AutoConfig

    if _looks_local(base_model) and not (Path(base_model).expanduser() / "config.json").is_file():
        where = Path(base_model).expanduser()
        raise ConfigError(
            f"base_model {base_model!r}: " + ("no config.json in that directory" if where.is_dir()
                                              else "no such directory"),
            field="base_model",
            hint="give the directory of a saved Hugging Face model (config.json + weights + tokenizer), "
            "or a Hugging Face model id such as 'meta-llama/Llama-3.1-8B-Instruct'",
        )
    try:
        return AutoConfig.from_pretrained(base_model)
    except Exception as exc:  # OSError, HFValidationError, ValueError: all mean "not a loadable model"
        raise ConfigError(
            f"base_model {base_model!r} could not be loaded: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}",
            field="base_model",
            hint="give a local directory containing config.json and weights, or a Hugging Face model id that is "
            "downloaded (or reachable: HF_HUB_OFFLINE unset)",
        ) from exc


def _peak_memory(dev: DeviceInfo) -> int:
    import torch

    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _make_bridge(cb: TrainCallbacks, dev: DeviceInfo, ckpt_dir: Path):
    from transformers import TrainerCallback

    class _Bridge(TrainerCallback):
        """transformers callback -> TrainCallbacks (step metrics, evals, checkpoints, clean stop)."""

        def __init__(self) -> None:
            self.stopped = False
            self._t = None
            self._tokens = 0

        def on_train_begin(self, args, state, control, **kw):
            self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen
            cb.on_start(int(state.max_steps))

        def on_step_end(self, args, state, control, **kw):
            if not self.stopped and cb.should_stop():
                self.stopped = True
                control.should_save = True  # checkpoint at this step boundary, then leave the loop
                control.should_training_stop = True
                cb.on_event("info", f"stop requested: stopping at step {state.global_step} after a checkpoint")

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:  # eval logs and the final summary are reported elsewhere
                return
            check_finite_step(int(state.global_step), logs)  # before this step can be checkpointed
            now = time.perf_counter()
            tokens = state.num_input_tokens_seen
            dt = max(now - (self._t or now), 1e-9)
            m = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            m["lr"] = m.pop("learning_rate", None)
            m["tokens_per_s"] = (tokens - self._tokens) / dt
            m["tokens"] = tokens
            m["memory"] = _peak_memory(dev)
            self._t, self._tokens = now, tokens
            cb.on_step(int(state.global_step), m)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            cb.on_eval(int(state.global_step), dict(metrics or {}))

        def on_save(self, args, state, control, **kw):
            cb.on_checkpoint(int(state.global_step), str(ckpt_dir / f"checkpoint-{state.global_step}"))

    return _Bridge()


NON_FINITE_HINT = ("lower hyperparameters.learning_rate or adapter.alpha (or set hyperparameters.max_grad_norm), "
                   "and check that the base model's weights are finite")


def check_finite_step(step: int, logs: dict[str, Any]) -> None:
    """Stop the run at the first non-finite loss or gradient norm: nothing after it is worth keeping."""
    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise TrainingError(f"{name} became {value} at step {step}", hint=NON_FINITE_HINT)


def check_finite_adapter(adapter_dir: str | Path) -> None:
    """Refuse an adapter whose saved weights hold NaN or inf (it must never reach the registry)."""
    from ...serve.adapters import non_finite_tensors

    path = Path(adapter_dir) / "adapter_model.safetensors"
    bad = non_finite_tensors(path)
    if bad:
        raise TrainingError(f"the trained adapter has non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]} "
                            f"({path})", hint=NON_FINITE_HINT)


def _resolve_resume(resume: str | bool | None, ckpt_dir: Path, cb: TrainCallbacks) -> str | None:
    if not resume:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            cb.on_event("warning", "resume requested but no checkpoint exists yet: starting from step 0")
        return last
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise ConfigError(f"{p} is not a training checkpoint (no trainer_state.json)", field="resume_from_checkpoint",
                          hint=f"pick a checkpoint-<step> directory under {ckpt_dir}")
    return str(p)


def train(run: "LocalRun", callbacks: TrainCallbacks | None = None, *,
          resume_from_checkpoint: str | bool | None = None) -> TrainOutcome:
    """Train the run (``run.LocalRun``: planned, its data and output directory set); return what was produced.

    Nothing is resolved again here: the run says the device, quantization, micro-batch, optimizer, speed-ups and
    per-layer checkpointing. After the fit check the run is written to ``<output_dir>/run.json`` (the record
    of what was trained). ``resume_from_checkpoint``: a checkpoint directory, or True for the newest one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from .peft_config import quantization_config

    if run.data is None or not run.options.output_dir:
        raise ConfigError("this run has no data or output directory: it was planned, not given to a job",
                          field="data", hint="build it with run.run_for_files(...) or start a job with finetune")
    cb = callbacks or TrainCallbacks()
    spec = run  # the run carries the spec's method, adapter and hyperparameters (as run.training)
    hp = run.training
    output_dir = Path(run.options.output_dir)
    ckpt_dir, adapter_dir, init_dir = output_dir / "checkpoints", output_dir / "adapter", output_dir / "init_adapter"
    train_path = run.data.train.path
    validation_path = run.data.validation.path if run.data.validation else None

    # ---- the run's decisions; the fit check before any weights
    config = _load_config(run.base_model)
    dev = DeviceInfo(run.device.type, run.device.memory_bytes, run.device.name)
    on_gpu, micro, accum = dev.type == "cuda", hp.micro_batch_size, hp.gradient_accumulation_steps
    layout, sharded = run.layout, _ranks.sharded(run.layout)  # None: one process; FSDP2 at any world size
    if layout:  # this rank's share of the global batch (the estimate is already the per-GPU one)
        micro, accum = layout["micro_batch"], layout["grad_accum"]
    _ranks.init_device(layout, on_gpu)
    decision, speed = run.quantization, run.speed_plan()
    if run.memory_estimate is None or speed is None:
        raise ConfigError(f"the run of {run.base_model} was planned without its config.json "
                          f"({run.estimate_skipped})", field="base_model",
                          hint="the worker re-plans it once the config is readable (run.check_facts)")
    est = run.memory_estimate.estimate()
    _memory.check_fits(est, what=f"training {run.base_model} ({decision.mode}, micro-batch {micro}, "
                                 f"max_length {hp.max_length})")
    cb.on_event("info", f"quantization: {decision.mode} ({decision.reason}); memory estimate {est.summary()}")
    cb.on_event("info", speed.summary())
    output_dir.mkdir(parents=True, exist_ok=True)
    if _ranks.local_rank() == 0:  # one writer per node
        (output_dir / "run.json").write_text(run.model_dump_json(indent=1))

    # ---- tokenizer + data
    try:
        tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    except Exception as exc:
        raise ConfigError(f"tokenizer of {run.base_model!r} could not be loaded: {exc}", field="base_model",
                          hint="the base model directory needs its tokenizer files") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare(train_path, tokenizer, method=spec.method, max_length=hp.max_length)
    val = prepare(validation_path, tokenizer, method=spec.method, max_length=hp.max_length) if validation_path else None
    if data.truncated_count:
        cb.on_event("warning", f"{data.truncated_count} of {len(data)} training examples exceed max_length="
                               f"{hp.max_length} tokens and are truncated")
    if data.no_loss_count:
        cb.on_event("warning", f"{data.no_loss_count} training examples have no trained token left and are skipped")

    packing = hp.packing.enabled if hp.packing is not None else False
    if packing is None:  # 'auto' on SFT: the plan left it to the tokenized rows
        from .resolve import packing_decision

        packing, why = packing_decision(spec.method, "auto", mean_tokens=data.mean_tokens, max_length=hp.max_length)
        cb.on_event("info", f"packing: {'on' if packing else 'off'} ({why})")

    if speed.unpadded and not packing and len(set(data.lengths)) == 1:  # no padding, so no attention mask
        speed = speed.for_unpadded()
        cb.on_event("info", f"every row has {data.lengths[0]} tokens, so no attention mask: {speed.summary()}")
    resume = _resolve_resume(resume_from_checkpoint, ckpt_dir, cb)
    if resume:
        cb.on_event("info", f"resuming from {resume}")

    # ---- model
    _quiet_progress_bars()
    bnb_cfg = quantization_config(decision)  # the run's mode: nothing is decided again
    if bnb_cfg is not None and (layout or {}).get("quant_storage"):  # FSDP2 shards 4-bit weights stored as bf16
        bnb_cfg.bnb_4bit_quant_storage = torch.bfloat16
    load_kw: dict[str, Any] = {"dtype": torch.bfloat16 if on_gpu else torch.float32}
    if bnb_cfg is not None:
        load_kw["quantization_config"] = bnb_cfg
    # FSDP2 moves a bf16 model's shards to the GPU itself (fully_shard); a 4-bit one is quantized on its
    # rank's GPU as it loads (accelerate shards Params4bit where they are)
    if on_gpu and (not sharded or bnb_cfg is not None):
        load_kw["device_map"] = {"": _ranks.local_rank() if layout
                                 else torch.device(run.options.device or "cuda").index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(run.base_model, **load_kw)
    except Exception as exc:
        raise ConfigError(f"base_model {run.base_model!r} could not be loaded as a causal LM: {exc}",
                          field="base_model", hint="tunekit trains decoder-only (causal LM) models") from exc
    # under FSDP2 never: its fp32 upcast would mix dtypes in the bf16-stored units (TRL skips it for sharded
    # QLoRA too); the frozen base and non-reentrant checkpointing need nothing else from it
    if decision.quantized and not speed.on("bf16_kbit") and not sharded:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=hp.checkpointing.enabled,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False

    set_seed(hp.seed)  # adapter init (and randomized PiSSA SVD) must be the same on resume
    from peft import LoraConfig, get_peft_model

    lkw = run.lora
    try:
        model = get_peft_model(model, LoraConfig(**lkw))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise peft_error_to_config_error(exc) from exc
    variants = _variants.of(spec.adapter)
    mutating = variants.init.mutates_base
    if mutating and not (resume and (init_dir / "adapter_config.json").is_file()):
        # saved before any step: the conversion to plain LoRA subtracts this initial adapter at the end
        model.save_pretrained(str(init_dir))

    speed_applied = _kernels.apply(model, speed, sharded=sharded)  # kernels, fused forwards, checkpointing
    speed_applied["varlen_attention"] = _use_varlen(model, dev.type, packing, config, run.options.speedups, cb)

    # ---- optimizer (named by the plan; LoRA+ builds it here with the same class)
    optim_name = hp.optimizer
    # LoRA+ builds the class its planned name says (layout.optimizer_for: never 8-bit under FSDP2)
    optimizers = (variants.optimizer.build(model, hp, optim_name, on_gpu), None)

    # ---- trainer
    trainer = _build_trainer(
        spec, model, tokenizer, data, val, ckpt_dir=ckpt_dir, micro=micro, accum=accum, on_gpu=on_gpu,
        optim_name=optim_name, optimizers=optimizers, gradient_checkpointing=False,  # kernels.apply set it per layer
        checkpoint_steps=run.options.checkpoint_steps, keep_checkpoints=run.options.keep_checkpoints,
        max_steps=run.options.max_steps, eval_steps=run.options.eval_steps, logging_steps=run.options.logging_steps,
        extra_args=_ranks.trainer_args(layout, model, on_gpu), packing=packing,
    )
    speed_applied["fp32_adapter_params"] = _kernels.after_trainer(trainer, speed)
    _ranks.after_trainer(trainer, layout)
    bridge = _make_bridge(cb, dev, ckpt_dir)
    trainer.add_callback(bridge)
    _gen_eval.add_to_trainer(trainer, run.options.eval_generate, validation_path, tokenizer, cb.on_eval)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to the callbacks, not stdout
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    with _kernels.sdpa_for_lengths(on_gpu, data.lengths) as cudnn_off:
        if cudnn_off:
            cb.on_event("info", "attention: cuDNN's SDPA off for this run (its batches change length between steps, "
                                "and it plans each new length: 0.1-1.8 s each on an H200); flash or memory-efficient "
                                "kernels run")
        speed_applied["cudnn_sdpa_off"] = cudnn_off
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        runtime = time.perf_counter() - t0
        state = trainer.state

        eval_loss = None
        if val is not None and not bridge.stopped:
            last_eval = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
            if last_eval is None or last_eval.get("step") != state.global_step:
                last_eval = trainer.evaluate()
            eval_loss = last_eval.get("eval_loss")

    from transformers.trainer_utils import get_last_checkpoint

    last_ckpt = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    adapter_path = None
    if not bridge.stopped:
        adapter_path = str(adapter_dir)
        save_kw = {"path_initial_model_for_weight_conversion": str(init_dir)} if mutating else {}
        if _ranks.save_adapter(trainer.model, adapter_dir, save_kw, layout):  # gathered from the shards
            check_finite_adapter(adapter_dir)
            tokenizer.save_pretrained(str(adapter_dir))
            cb.on_event("info", f"adapter saved to {adapter_dir}")

    session_tokens = state.num_input_tokens_seen
    train_loss = _last_train_loss(state.log_history, result)
    metrics = {
        "train_loss": train_loss,
        "mean_train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "eval_loss": eval_loss,
        "steps": int(state.global_step),
        "max_steps": int(state.max_steps),
        "epochs": float(state.epoch or 0),
        "tokens": int(session_tokens),
        "runtime_s": runtime,
        "tokens_per_s": (result.metrics.get("train_tokens_per_second") if result.metrics else None)
        or (session_tokens / runtime if runtime else None),
        "peak_memory_bytes": _peak_memory(dev),
    }
    return TrainOutcome(
        adapter_path=adapter_path,
        metrics=metrics,
        truncated_count=data.truncated_count,
        no_loss_count=data.no_loss_count,
        examples=len(data),
        stopped=bridge.stopped,
        last_checkpoint=last_ckpt,
        resumed_from=resume,
        lora_config=variants.saved_config(lkw),
        quantization={"mode": decision.mode, "reason": decision.reason},
        optimizer=_optimizer_name(trainer, optim_name),
        micro_batch=micro,
        grad_accum=accum,
        gradient_checkpointing=speed.checkpointed_layers > 0,
        device=dev.type,
        dtype=hp.dtype,
        masking=data.masking,
        memory_estimate={"total_bytes": est.total_bytes, "breakdown": est.breakdown, "fits": est.fits,
                         "device_bytes": est.device_bytes},
        versions=_provenance.library_versions(),
        tokenizer_sha256=(_provenance.file_sha256(adapter_dir / "tokenizer.json")
                          if (adapter_dir / "tokenizer.json").is_file() else None),
        chat_template_sha256=_provenance.text_sha256(
            tokenizer.chat_template if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template else None),
        base_model_revision=getattr(config, "_commit_hash", None),
        extra={"row_kind": data.row_kind, "packing": packing, "validation_examples": len(val) if val else 0,
               "validation_truncated": val.truncated_count if val else 0,
               "base_linear_class": _adapted_base_class(trainer.model),
               "fsdp_units": _ranks.fsdp_units(trainer.model) if sharded else 0,
               "optimizer_lrs": _initial_lrs(trainer), "speed": {**speed.to_dict(), "applied": speed_applied}},
    )


def _use_varlen(model: Any, device_type: str, packing: bool, config: Any, speedups: Any, cb: TrainCallbacks) -> bool:
    """Packed rows attend per example through torch's varlen flash attention where it can run (varlen.py); the
    decision is logged for packed runs (unpacked ones have nothing to split)."""
    from .speed import disabled

    model_type = getattr(getattr(config, "get_text_config", lambda: config)(), "model_type", "")
    on, why = _varlen.decide(device_type, bool(packing), model_type, disabled(speedups))
    if on and not _varlen.use(model):
        on, why = False, "the model is not loaded with sdpa attention: its own attention handles the packed rows"
    if packing:
        cb.on_event("info", f"attention: {'varlen' if on else 'sdpa'} for packed rows ({why})")
    return on


def _quiet_progress_bars() -> None:
    """The worker's log is for tunekit's events; HF progress bars (dataset maps, weight loading) only add noise."""
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # cosmetic only
        pass


def _last_train_loss(history: list[dict], result: Any) -> float | None:
    last = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    return float(last) if last is not None else (float(result.training_loss) if result.training_loss else None)


def _inner_optimizer(trainer: Any) -> Any:
    opt = getattr(trainer, "optimizer", None)
    return getattr(opt, "optimizer", opt)  # accelerate wraps it


def _optimizer_name(trainer: Any, planned: str) -> str:
    inner = _inner_optimizer(trainer)
    return f"{planned} ({type(inner).__module__}.{type(inner).__name__})" if inner is not None else planned


def _initial_lrs(trainer: Any) -> list[float]:
    """Distinct learning rates of the optimizer's parameter groups (LoRA+ has several)."""
    inner = _inner_optimizer(trainer)
    if inner is None:
        return []
    return sorted({float(g.get("initial_lr", g["lr"])) for g in inner.param_groups if g["params"]})


def _adapted_base_class(model: Any) -> str | None:
    """Class of the frozen layer under the first LoRA layer (Linear4bit proves the QLoRA path)."""
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            return type(module.base_layer).__name__
    return None


def _build_trainer(spec, model, tokenizer, data: PreparedData, val: PreparedData | None, *, ckpt_dir: Path,
                   micro: int, accum: int, on_gpu: bool, optim_name: str, optimizers, gradient_checkpointing: bool,
                   checkpoint_steps: int, keep_checkpoints: int | None, max_steps: int | None, eval_steps,
                   logging_steps: int, extra_args: dict[str, Any] | None = None, packing: bool = False):
    from datasets import Dataset

    hp = spec.training
    common: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=hp.epochs,
        max_steps=max_steps if max_steps else -1,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers >= 5)
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        optim=optim_name.split("+")[-1],
        logging_steps=logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a non-finite loss must be seen (check_finite_step), not averaged away
        save_strategy="steps",
        save_steps=checkpoint_steps,
        save_total_limit=keep_checkpoints,  # older ones are deleted only after a newer one is fully written
        eval_strategy="steps" if val is not None else "no",
        eval_steps=eval_steps if val is not None else None,  # the run's (run.plan_run sets its default)
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        max_length=hp.max_length,
        **(extra_args or {}),
    )
    _set_checkpointing(common, gradient_checkpointing)
    train_ds = Dataset.from_list(data.records)
    eval_ds = Dataset.from_list(val.records) if val is not None else None
    try:
        if spec.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common, beta=hp.dpo_beta)
            return DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, optimizers=optimizers)
        from trl import SFTConfig, SFTTrainer

        # packing: TRL's best-fit-decreasing packs whole rows (none split) and is padding-free: the collator
        # restarts position_ids at each row, from which the attention (sdpa/eager mask, flash varlen) keeps
        # rows apart; the completion/assistant mask is turned into labels before packing, so it is kept
        args = SFTConfig(**common, completion_only_loss=data.trl_format == "prompt_completion",
                         assistant_only_loss=False, packing=packing, packing_strategy="bfd")
        return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, optimizers=optimizers)
    except ValueError as exc:
        msg = str(exc)
        if "peft" in msg.lower() or "lora" in msg.lower():
            raise peft_error_to_config_error(exc) from exc
        raise


def _set_checkpointing(kw: dict[str, Any], on: bool) -> None:
    """transformers 5.24 renamed gradient_checkpointing -> activation_checkpointing; 5.17 has only the old name."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kw[name] = on
    kw[f"{name}_kwargs"] = {"use_reentrant": False} if on else None
    if name == "activation_checkpointing":
        kw["gradient_checkpointing"] = None  # TRL defaults the old name to True; let the new one decide
