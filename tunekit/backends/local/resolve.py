"""One resolution of a local training run: spec + device -> every decision the run makes before loading weights.

`resolve_run` is the single place that decides micro-batch / gradient accumulation, the compute dtype,
gradient checkpointing, the quantization mode (with the memory estimate behind 'auto'), the memory fit,
the optimizer name and the speed plan. `run.plan_run` turns what it returns into the LocalRun the plan
shows, the store keeps and the worker trains. Pure: torch is imported only to read the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._exceptions import ConfigError
from . import memory as _memory
from . import speed as _speed
from . import variants as _variants
from .peft_config import DeviceInfo, QuantDecision, check_combination, resolve_quantization
from .suggest import LENGTH_CHANGE


@dataclass
class RunPlan:
    """What a run will do. Without a readable config.json (``estimate_skipped`` says why) there is no memory
    estimate or speed plan, and 'auto' quantization on a GPU picks NF4."""

    device: DeviceInfo
    micro_batch: int
    grad_accum: int
    compute_dtype: str  # "bf16" on CUDA, "fp32" on CPU (QLoRA computes in bf16 either way)
    gradient_checkpointing: bool  # requested, else the default (on for GPU, off for CPU)
    budget_bytes: int | None  # memory the fit check assumes
    quant: QuantDecision
    optimizer: str  # TrainingArguments.optim name; "loraplus+<name>" when LoRA+ builds the optimizer
    estimate: _memory.MemoryEstimate | None
    estimate_skipped: str | None = None
    speed: _speed.SpeedPlan | None = None
    model_config: dict[str, Any] | None = None  # what the estimate read (layout.py estimates per GPU from it)
    estimate_kwargs: dict[str, Any] | None = None  # the speed path's memory.estimate arguments
    packing: bool | None = False  # None: 'auto' on SFT, left to the worker's tokenized rows (memory allows it)
    packing_reason: str = "requested"

    @property
    def dtype(self) -> str:
        """The recorded dtype: "nf4+bf16" for QLoRA, else the compute dtype."""
        return "nf4+bf16" if self.quant.quantized else self.compute_dtype


def micro_batch_of(spec: Any) -> tuple[int, int]:
    """(micro-batch, grad accumulation): spec.batch_size is the global batch."""
    hp = spec.hyperparameters
    bs, ga = hp.batch_size, hp.gradient_accumulation_steps
    if bs % ga:
        raise ConfigError(
            f"hyperparameters.batch_size={bs} is not a multiple of gradient_accumulation_steps={ga}",
            field="hyperparameters.gradient_accumulation_steps",
            hint="batch_size is the global batch = micro-batch x gradient_accumulation_steps; pick a divisor",
        )
    return bs // ga, ga


def device_info(device: str | None) -> DeviceInfo:
    """The device a run uses (default: CUDA when visible) and its memory; the one place torch reads it."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA GPU is visible", field="device",
                              hint="drop device= to train on CPU (tiny models only), or check CUDA_VISIBLE_DEVICES")
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return DeviceInfo("cuda", int(props.total_memory), props.name)
    return DeviceInfo("cpu", host_memory_bytes(), "cpu")


# a container's memory limit (cgroup v2, then v1): the machine's physical memory is not what the process may use
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes() -> int | None:
    """The host memory this process may use (what the activation offloads may pin a share of): the physical memory,
    or a container's lower limit; None where unknown."""
    import os

    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        phys = None
    limits = []
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge v1 value: no limit below the physical memory
            limits.append(int(text))
    known = [v for v in (phys, *limits) if v]
    return min(known) if known else None


def optimizer_name(spec: Any, quantized: bool, on_gpu: bool) -> str:
    """AdamW with fp32 state, fused on GPU, for LoRA and QLoRA alike; LoRA+ builds its own optimizer of the same
    class, named "loraplus+<optim>".

    Not the QLoRA recipe's bitsandbytes (paged) 8-bit AdamW: it steps each parameter from Python (448 launches for
    an 8B model's r=16 all-linear adapter, 608 with DoRA's magnitudes), which on an H200 left the GPU idle for
    29-52 ms of a 0.83-0.90 s step (docs/benchmarks.md), where the fused AdamW steps them all in a few kernels.
    An adapter is small (fp32 state: 8 bytes per parameter, +0.24 GiB at 42M parameters), and fp32 state is
    AdamW itself rather than its 8-bit quantization. A resumed run keeps the optimizer it was recorded with
    (run.check_facts), 8-bit included. ``quantized``: LoRA+'s name (variants.LoraPlus)."""
    name = "adamw_torch_fused" if on_gpu else "adamw_torch"
    return _variants.of(spec.adapter).optimizer.name(name, quantized)


def read_config(base_model: str, *, fetch: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """config.json of the base model from a local dir or the Hugging Face cache. The plan never downloads;
    the worker (``fetch=True``) downloads the config of a hub model not yet cached, into the cache, so that
    its run can be planned with it. Returns (config, None) or (None, why it is unknown); a download that fails
    raises ``hub_error``'s ConfigError (loading the model would read the same file the same way, so the run
    cannot proceed)."""
    cfg = _memory.read_model_config(base_model)
    if cfg is not None:
        return cfg, None
    try:
        import huggingface_hub

        path = huggingface_hub.try_to_load_from_cache(base_model, "config.json")
        if fetch and not isinstance(path, str):
            path = huggingface_hub.hf_hub_download(base_model, "config.json")
    except Exception as exc:  # noqa: BLE001 - not a valid hub id, offline, gated: said at once when fetching
        if fetch:
            raise hub_error(base_model, exc) from exc
        path = None
    if isinstance(path, str) and Path(path).is_file():
        return json.loads(Path(path).read_text()), None
    return None, f"{base_model}: config.json is neither a local directory nor in the Hugging Face cache yet"


def hub_error(base_model: str, exc: BaseException) -> ConfigError:
    """A failed download of ``base_model``'s config.json as a ConfigError with its cause and the next step.
    The huggingface_hub classes are tested most specific first: GatedRepoError is a RepositoryNotFoundError,
    LocalEntryNotFoundError an EntryNotFoundError."""
    from huggingface_hub import errors as e

    first = (str(exc).strip().splitlines() or [""])[0][:300]
    cause = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    page = f"https://huggingface.co/{base_model}"
    if isinstance(exc, e.GatedRepoError):
        hint = (f"{base_model} is gated: accept its terms on {page} and set HF_TOKEN to a token of that account "
                f"(where the worker runs)")
    elif isinstance(exc, e.RepositoryNotFoundError):
        hint = (f"no model {base_model!r} on the Hugging Face Hub, or a private one: check the model id (a local "
                f"directory must exist on this machine), or set HF_TOKEN to a token that can read it")
    elif isinstance(exc, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
        hint = (f"the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and {base_model} is not in the Hugging "
                f"Face cache: connect this machine (unset HF_HUB_OFFLINE), or download the model into this cache "
                f"first (`hf download {base_model}`)")
    elif isinstance(exc, e.EntryNotFoundError):
        hint = f"{base_model} has no config.json: tunekit trains transformers causal LMs; check the model id"
    elif isinstance(exc, e.HFValidationError):
        hint = (f"{base_model!r} is neither a directory on this machine nor a Hugging Face model id: check the "
                f"path or the id")
    elif status in (401, 403):
        hint = f"the Hub refused the request ({status}): set HF_TOKEN to a token that can read {base_model}"
    else:
        hint = (f"check the network, HF_TOKEN, HF_HUB_OFFLINE and the model id {base_model!r}"
                + (f" (the Hub answered {status}; try again later)" if status else ""))
    return ConfigError(f"config.json of base_model {base_model!r} could not be fetched from the Hugging Face Hub "
                       f"({cause}); nothing was trained", field="base_model", hint=hint)


def resolve_run(
    spec: Any,
    *,
    device: str | None = None,
    gradient_checkpointing: bool | None = None,
    memory_budget_bytes: int | None = None,
    model_config: dict[str, Any] | None = None,
    speedups: str | list[str] = "auto",
    packing: bool | str = False,
) -> RunPlan:
    """Resolve every pre-load decision of a run of ``spec``.

    ``model_config`` None reads config.json from a local directory or the HF cache (never downloads, never
    needs torch beyond the device). ``speedups`` is provider_options.local.speedups, ``packing``
    provider_options.local.packing (decided here with the memory its attention mask takes: `packing_decision`).
    Raises ConfigError for a bad batch split, a refused combination (PiSSA on NF4) or packing that cannot fit.
    The memory fit is estimated here but not enforced: callers decide when to refuse (`memory.check_fits`).
    """
    hp, a = spec.hyperparameters, spec.adapter
    micro, accum = micro_batch_of(spec)
    dev = device_info(device)
    on_gpu = dev.type == "cuda"
    auto_ckpt = gradient_checkpointing is None
    if gradient_checkpointing is None:
        gradient_checkpointing = on_gpu  # the measured GPU recipes use it; tiny CPU runs are faster without
    compute_dtype = "bf16" if on_gpu else "fp32"
    budget = memory_budget_bytes or dev.total_memory
    skipped = None
    if model_config is None:
        model_config, skipped = read_config(str(spec.base_model))
    off = _speed.disabled(speedups)
    est_kw = _speed.estimate_kwargs(spec, model_config, dev.type, off) if model_config is not None else {}

    host = host_memory_bytes() if on_gpu else None  # what the activation offload may pin
    packed, pack_reason = packing_decision(spec.method, packing)
    # a packed row's attention: varlen flash attention where train() will run it (no mask), else sdpa's mask
    pack_kind = "packed"
    if model_config is not None:
        from . import varlen as _varlen

        pack_kind = _varlen.packed_attention(dev.type, (model_config.get("text_config") or model_config).get(
            "model_type", ""), off)
    # rows of a micro-batch are padded unless packed (their lengths are not known before tokenizing): the mask
    # of the conservative case until packing is decided; 'auto' decides the quantization unpacked
    est_kw["attention_mask"] = pack_kind if packed is True else "padded"

    def estimate(quant: str, ckpt: bool | None = None, **long: Any) -> _memory.MemoryEstimate:
        # long: the long-context terms (offload_layers, tiled_mlp) and, searching the longest length, max_length
        kw = dict(micro_batch=micro, max_length=hp.max_length, quantization=quant, r=a.r,
                  target_modules=a.target_modules, use_dora=a.use_dora,
                  gradient_checkpointing=gradient_checkpointing if ckpt is None else ckpt,
                  dtype=compute_dtype if quant != "nf4" else "bf16", device_memory_bytes=budget,
                  method=spec.method, device_type=dev.type, host_memory_bytes=host, **est_kw)
        return _memory.estimate(model_config, **{**kw, **long})

    bf16_fits = None
    if spec.quantization == "auto" and on_gpu and model_config is not None:
        bf16_fits = estimate("none").fits
    quant = resolve_quantization(spec, dev, bf16_fits)
    check_combination(spec, quant)  # e.g. PiSSA on a 4-bit base: refused before anything loads
    est = speed = None
    if model_config is not None and packed is not False:
        packed, pack_reason = packing_decision(
            spec.method, packing, mean_tokens=None, max_length=hp.max_length,
            memory=(estimate(quant.mode, True, attention_mask=pack_kind),
                    estimate(quant.mode, True, attention_mask="padded")))
        # 'auto' left undecided (None) may still pack: the fit is checked with the packed attention
        est_kw["attention_mask"] = "padded" if packed is False else pack_kind
    if model_config is not None:
        est = estimate(quant.mode)
        speed = _speed.plan(spec, model_config, dev.type, quant.quantized,
                            gradient_checkpointing=gradient_checkpointing, auto_checkpointing=auto_ckpt,
                            budget_bytes=budget, estimate=lambda ck, **kw: estimate(quant.mode, ck, **kw), off=off,
                            max_length=hp.max_length)
        if est_kw["attention_mask"] == "padded" and speed.memory_estimate_bytes is not None:
            # rows that all have one length need no mask: the split for them, taken by the worker once it has
            # tokenized the rows (train())
            alt = _speed.plan(spec, model_config, dev.type, quant.quantized,
                              gradient_checkpointing=gradient_checkpointing, auto_checkpointing=auto_ckpt,
                              budget_bytes=budget, off=off, max_length=hp.max_length,
                              estimate=lambda ck, **kw: estimate(quant.mode, ck, **{"attention_mask": "none", **kw}))
            if (alt.checkpointed_layers, alt.mlp_recompute_layers) != (speed.checkpointed_layers,
                                                                       speed.mlp_recompute_layers):
                speed.unpadded = {"checkpointed_layers": alt.checkpointed_layers,
                                  "mlp_recompute_layers": alt.mlp_recompute_layers,
                                  "memory_estimate_bytes": alt.memory_estimate_bytes,
                                  "reason": alt.reasons["checkpointing"] + " (rows of one length: no attention mask)",
                                  "recompute_mlp": alt.reasons.get("recompute_mlp", ""),
                                  "offload_mlp": alt.on("offload_mlp")}
        if speed.offload_layers or speed.mlp_tile_tokens:  # the fit check is the long-context path's
            est = estimate(quant.mode, True, offload_layers=speed.offload_layers,
                           tiled_mlp=bool(speed.mlp_tile_tokens))
        elif speed.longest_length is not None:  # nothing fits at this length: the longest that does, first
            # (instead of the estimate's own shorter length, found without the long-context means)
            est.suggestions[:] = [speed.longest_length_hint] + [
                s for s in est.suggestions if not s.startswith(LENGTH_CHANGE)]
    return RunPlan(
        device=dev, micro_batch=micro, grad_accum=accum, compute_dtype=compute_dtype,
        gradient_checkpointing=gradient_checkpointing, budget_bytes=budget, quant=quant,
        optimizer=optimizer_name(spec, quant.quantized, on_gpu), estimate=est, estimate_skipped=skipped, speed=speed,
        model_config=model_config, estimate_kwargs=est_kw, packing=packed, packing_reason=pack_reason,
    )


PACK_BELOW = 0.5  # 'auto' packs when the rows' mean length is at most this share of max_length
# 'auto' does not pack when the packed micro-batch's attention (its block-diagonal mask over micro_batch x max_length
# tokens, SDPA's bias of it, the K/V copies: attention.py) would take more than this share of the
# memory budget: memory the unpacked run does not need, which grows with the square of the packed length
PACK_MASK_SHARE = 0.25


def packing_decision(method: str, requested: bool | str, *, mean_tokens: float | None = None,
                     max_length: int | None = None,
                     memory: tuple[_memory.MemoryEstimate, _memory.MemoryEstimate] | None = None,
                     ) -> tuple[bool | None, str]:
    """(packed?, why) for provider_options.local.packing. ``mean_tokens`` None: the rows are not tokenized
    yet, so 'auto' on SFT is left to the worker (None), which calls this again with the tokenized mean.
    ``memory``: the (packed, unpacked) estimates of the run with every layer checkpointed (resolve_run's): where the
    packed one does not fit and the unpacked one does, 'auto' does not pack and true is refused; 'auto' does not pack
    either where the packed attention takes more than PACK_MASK_SHARE of the budget."""
    if method == "dpo":
        if requested is True:
            raise ConfigError("provider_options.local.packing=true: DPO trains chosen/rejected pairs of one prompt "
                              "and cannot be packed", field="provider_options.local.packing",
                              hint="drop packing (or set it to 'auto' or false) for method='dpo'")
        return False, "DPO does not pack (chosen/rejected pairs)"
    if requested is False:
        return False, "requested"
    if memory is not None:
        packed, unpacked = memory
        attn = packed.assumptions.get("attention_bytes", 0)
        tokens = packed.assumptions["micro_batch"] * packed.assumptions["max_length"]
        what = (f"the packed micro-batch's attention mask over {tokens} tokens (one row, block-diagonal) takes "
                f"~{_memory.human_bytes(attn)}")
        if packed.fits is False and unpacked.fits is not False:
            if requested is True:
                raise ConfigError(
                    f"provider_options.local.packing=true: {what} and the run no longer fits "
                    f"({packed.summary()}; unpacked {_memory.human_bytes(unpacked.total_bytes)})",
                    field="provider_options.local.packing",
                    hint="set packing to false (or 'auto'), or a shorter hyperparameters.max_length or micro-batch")
            return False, f"auto: not packed: {what}, which does not fit (unpacked it does)"
        budget = packed.device_bytes
        if requested == "auto" and budget and attn > PACK_MASK_SHARE * budget:
            return False, (f"auto: not packed: {what}, more than {PACK_MASK_SHARE:.0%} of the "
                           f"{_memory.human_bytes(budget)} budget")
    if isinstance(requested, bool):
        return requested, "requested"
    if mean_tokens is None:
        return None, (f"auto: decided once the rows are tokenized (on when their mean length is at most "
                      f"{PACK_BELOW:g} x max_length)")
    on = mean_tokens <= PACK_BELOW * max_length
    return on, (f"auto: rows average {mean_tokens:.0f} tokens, {'at most' if on else 'more than'} "
                f"{PACK_BELOW:g} x max_length={max_length}")
