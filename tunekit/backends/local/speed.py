"""The speed plan of a local run: which speed-ups it uses and why, and how many decoder layers are checkpointed.

Pure (no torch): `plan` and `estimate_kwargs` are what resolve_run calls at plan time; kernels.py applies the
plan to the PEFT model. Nothing here changes what is trained (same spec, same loss up to rounding;
tests/test_local_speed.py checks each one against the path without it). The optimisations:

  liger        Liger's Triton RMSNorm, SwiGLU and RoPE kernels on the decoder (CUDA only). Its fused linear
               cross-entropy is not used: TRL's SFTTrainer already runs its own chunked LM head, so the
               batch x seq x vocab logits are never materialised.
  bf16_kbit    QLoRA without `prepare_model_for_kbit_training`'s fp32 upcast of the embeddings, LM head and
               norms: the residual stream stays bf16 (half the checkpointed activations, no fp32<->bf16 casts
               around every matmul). bf16 autocast already does the matmuls in bf16.
  fast_lora    the LoRA update folded into the base GEMM's epilogue (kernels.py; on a 4-bit base nf4.py).
  fast_dora    DoRA's weight norm from cached ||W||^2 plus rank-r products, once per forward pass, and
               without dropout the whole DoRA layer as one fused forward (kernels.py, nf4.py).
  checkpointing gradient checkpointing only on as many decoder layers as the memory budget needs (the rest
               keep their activations and skip the recompute); decided from memory.estimate.
  fp32_adapters not a speed-up but a numerics guard: TRL casts a quantized model's LoRA A/B to bf16, where
               AdamW steps of lr ~2e-4 are partly rounded away (the loss curve lags the plain recipe's, which
               keeps PEFT's fp32 adapters); they go back to fp32 (autocast still runs the matmuls in bf16).

`provider_options.local.speedups` turns them off for diagnosis and benchmarks ("off", or ["-liger", "-fast_dora"]);
the plan records the value with the run (`disabled` reads it), so a resumed worker makes the same choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import variants as _variants
from .memory import GiB

OPTIMISATIONS = ("liger", "bf16_kbit", "fast_lora", "fast_dora", "checkpointing", "fp32_adapters")
OFF_BY = "disabled by provider_options.local.speedups"
# model types Liger's instance patching covers and that were checked to share Llama's module layout
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def disabled(speedups: str | list[str] = "auto") -> frozenset[str]:
    """Optimisations switched off by provider_options.local.speedups ("off" = all; ["-a", "-b"] = those).
    The option's model (LocalOptions) has already checked the names."""
    if speedups == "off":
        return frozenset(OPTIMISATIONS)
    if speedups == "auto":
        return frozenset()
    return frozenset(p.lstrip("-") for p in speedups)


@dataclass
class SpeedPlan:
    """Which speed-ups a run uses, and why (shown in the run's events and recorded in the outcome)."""

    enabled: dict[str, bool]
    reasons: dict[str, str]
    num_layers: int
    checkpointed_layers: int  # decoder layers under gradient checkpointing (the first ones); 0 = none
    memory_estimate_bytes: int | None = None  # estimated peak with this checkpointing choice
    notes: list[str] = field(default_factory=list)

    def on(self, name: str) -> bool:
        return bool(self.enabled.get(name))

    def summary(self) -> str:
        on = [k for k, v in self.enabled.items() if v and k != "checkpointing"]
        ck = (f"checkpointing {self.checkpointed_layers}/{self.num_layers} layers" if self.checkpointed_layers
              else "no checkpointing")
        out = f"speed-ups: {', '.join(on) or 'none'}; {ck} ({self.reasons.get('checkpointing', '')})"
        return "; ".join([out, *self.notes])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_kwargs(spec: Any, cfg: dict[str, Any] | None = None, device_type: str = "cpu",
                    off: frozenset[str] = frozenset()) -> dict[str, Any]:
    """memory.estimate arguments describing the path train() really takes (fused LM head, bf16 QLoRA, and
    on CUDA Liger's kernels with the fused LoRA forward, which keep fewer activations per layer)."""
    fused = bool(cfg) and _liger(cfg, device_type)[0] and not {"liger", "fast_lora"} & off
    return {"fused_lm_head": spec.method == "sft", "kbit_upcast": "bf16_kbit" in off, "fused_kernels": fused,
            "lora_dropout": spec.adapter.dropout}


def _liger(cfg: dict[str, Any], device_type: str) -> tuple[bool, str]:
    """Whether Liger's kernels can run on this model and device, and why (not)."""
    if device_type != "cuda":
        return False, "CUDA only (Triton kernels)"
    model_type = (cfg.get("text_config") or cfg).get("model_type", "")
    if model_type not in LIGER_MODEL_TYPES:
        return False, f"model type {model_type!r} not covered"
    if not _importable("liger_kernel") or not _importable("triton"):
        return False, "liger-kernel/triton not installed"
    return True, "RMSNorm, SwiGLU, RoPE kernels (the LM head is TRL's chunked one)"


def _layers(cfg: dict[str, Any]) -> int:
    c = cfg.get("text_config") or cfg
    return int(c.get("num_hidden_layers") or c.get("n_layer") or 0)


def plan(
    spec: Any,
    cfg: dict[str, Any],
    device_type: str,
    quantized: bool,
    *,
    gradient_checkpointing: bool,
    auto_checkpointing: bool,
    budget_bytes: int | None,
    estimate: Any = None,
    off: frozenset[str] = frozenset(),
) -> SpeedPlan:
    """Decide the speed-ups of one run.

    ``estimate(gradient_checkpointing: bool) -> MemoryEstimate`` is train()'s estimator for the resolved
    quantization; with ``auto_checkpointing`` (the caller did not force it) and a known ``budget_bytes``, it
    decides how many layers need checkpointing. ``device_type`` is "cuda" or "cpu"; ``off`` is `disabled(...)`.
    """
    cuda = device_type == "cuda"
    en: dict[str, bool] = {}
    why: dict[str, str] = {}

    def decide(name: str, ok: bool, reason: str) -> None:
        en[name] = ok and name not in off
        why[name] = OFF_BY if (ok and name in off) else reason

    liger_ok, liger_why = _liger(cfg, device_type)
    decide("liger", liger_ok, liger_why)
    decide("bf16_kbit", quantized, "QLoRA: embeddings/LM head/norms stay bf16 (no fp32 upcast)" if quantized
           else "not quantized")
    decide("fast_lora", True, "LoRA update as one addmm epilogue")
    form = _variants.of(spec.adapter).form
    for name, (ok, reason) in form.speedups().items():  # DoRA's fused forward
        decide(name, ok, reason)
    notes = form.notes(spec.adapter)
    decide("fp32_adapters", quantized, "QLoRA: adapters kept fp32 like PEFT's default (TRL casts them to bf16)"
           if quantized else "not quantized (adapters already fp32)")

    n = _layers(cfg)
    ckpt, est_bytes = (n if gradient_checkpointing else 0), None
    if not gradient_checkpointing:
        why["checkpointing"] = "off" + (" (CPU: tiny models train faster without)" if not cuda else "")
    elif "checkpointing" in off or not auto_checkpointing or not budget_bytes or estimate is None or n == 0:
        why["checkpointing"] = ("all layers (" + (OFF_BY if "checkpointing" in off
                                                   else "requested" if not auto_checkpointing
                                                   else "no memory budget known") + ")")
    else:
        ckpt, est_bytes, why["checkpointing"] = _checkpoint_layers(n, budget_bytes, estimate)
    en["checkpointing"] = ckpt > 0
    return SpeedPlan(en, why, n, ckpt, est_bytes, notes)


def _checkpoint_layers(n: int, budget: int, estimate: Any) -> tuple[int, int, str]:
    """Fewest checkpointed layers whose estimated peak fits the budget (the same headroom as the fit check);
    the peak of each choice is memory.kept_layers_peak (the kept layers are the last ones)."""
    from .memory import HEADROOM, kept_layers_peak

    full, none = estimate(True), estimate(False)
    keep = next((k for k in range(n, 0, -1) if kept_layers_peak(full, none, n, k) <= HEADROOM * budget), 0)
    peak = kept_layers_peak(full, none, n, keep)
    per_layer = (none.total_bytes - kept_layers_peak(full, none, n, 1)) / max(1, n - 1)
    if keep == n:
        reason = f"not needed: ~{none.total_bytes / GiB:.1f} GiB without it fits {budget / GiB:.1f} GiB"
    elif peak > HEADROOM * budget:  # the fit check refuses the run
        reason = f"all {n} layers, and ~{peak / GiB:.1f} GiB still exceeds {budget / GiB:.1f} GiB"
    else:
        reason = (f"{n - keep} of {n} layers so that ~{peak / GiB:.1f} GiB fits {budget / GiB:.1f} GiB "
                  f"(~{per_layer / GiB:.2f} GiB per un-checkpointed layer)")
    return n - keep, peak, reason


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
