"""Speed-ups of the local training path: decided per run (`plan`), applied to the PEFT model (`apply`).

Nothing here changes what is trained (same spec, same loss up to rounding; tests/test_local_speed.py checks
each one against the path without it). What each optimisation does, and why it pays:

  liger        Liger's Triton RMSNorm, SwiGLU and RoPE kernels on the decoder (CUDA only). Its fused linear
               cross-entropy is not used: TRL's SFTTrainer already runs its own chunked LM head, so the
               batch x seq x vocab logits are never materialised.
  bf16_kbit    QLoRA without `prepare_model_for_kbit_training`'s fp32 upcast of the embeddings, LM head and
               norms: the residual stream stays bf16 (half the checkpointed activations, no fp32<->bf16 casts
               around every matmul). bf16 autocast already does the matmuls in bf16.
  fast_lora    the LoRA update folded into one GEMM epilogue: addmm(base_out, A(x), B^T, alpha=scaling)
               instead of B(A(x)) -> * scaling -> + base_out (and QLoRA's defensive clone): 4-6 fewer passes over
               every adapted layer's output, forward and backward. On a 4-bit base (nf4.py) base + update is one
               GEMM over [x | A x] and [W | s B] instead: rounded once, so the first, tiny updates are kept (the
               16-bit path rounds twice, as PEFT's bf16 LoRA does).
  fast_dora    DoRA's weight norm ||W + s*B@A|| (detached by design) from cached ||W||^2 plus two rank-r
               products, once per forward pass (the checkpoint recompute reuses it), instead of dequantizing W
               and materialising W + s*B@A in every forward and again in the recompute. Without dropout the
               DoRA layer is (m/n) * (base + s*B A x): on a 4-bit base (nf4.py) m/n is folded into the block
               scales and into B, with the norms of all layers computed together once per pass; on a 16-bit
               base it is one GEMM epilogue plus one addcmul, kept in the activations' dtype. QLoRA layers
               (LoRA or DoRA) run as one autograd function (nf4.py).
  checkpointing gradient checkpointing only on as many decoder layers as the memory budget needs (the rest
               keep their activations and skip the recompute); decided from memory.estimate.
  fp32_adapters not a speed-up but a numerics guard: TRL casts a quantized model's LoRA A/B to bf16, where
               AdamW steps of lr ~2e-4 are partly rounded away (the loss curve lags the plain recipe's, which
               keeps PEFT's fp32 adapters); they go back to fp32 (autocast still runs the matmuls in bf16).

`provider_options.local.speedups` turns them off for diagnosis and benchmarks ("off", or ["-liger", "-fast_dora"]);
the plan records the value with the run (`disabled` reads it), so a resumed worker makes the same choice.
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass, field
from typing import Any

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
    return {"fused_lm_head": spec.method == "sft", "kbit_upcast": "bf16_kbit" in off, "fused_kernels": fused}


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
    decide("fast_dora", bool(spec.adapter.use_dora), "cached DoRA weight norm" if spec.adapter.use_dora
           else "no DoRA")
    notes = []
    if spec.adapter.use_dora and spec.adapter.dropout > 0:
        notes.append(f"DoRA with adapter.dropout={spec.adapter.dropout}: PEFT's DoRA applies the dropout to the "
                     "base term too, so every adapted layer runs its base matmul twice; adapter.dropout=0 takes the "
                     "fused DoRA path")
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
    """Fewest checkpointed layers whose estimated peak fits the budget (the same headroom as the fit check)."""
    from .memory import HEADROOM

    full, none = estimate(True), estimate(False)
    per_layer = max(1, (none.total_bytes - full.total_bytes) / n)
    room = HEADROOM * budget - full.total_bytes
    keep = int(max(0, min(n, room // per_layer)))  # layers that keep their activations
    peak = int(full.total_bytes + keep * per_layer)
    gib = 2**30
    if keep == n:
        reason = f"not needed: ~{none.total_bytes / gib:.1f} GiB without it fits {budget / gib:.1f} GiB"
    else:
        reason = (f"{n - keep} of {n} layers so that ~{peak / gib:.1f} GiB fits {budget / gib:.1f} GiB "
                  f"(~{per_layer / gib:.2f} GiB per un-checkpointed layer)")
    return n - keep, peak, reason


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------ apply

def apply(model: Any, sp: SpeedPlan) -> dict[str, Any]:
    """Apply the plan to a PEFT model (after get_peft_model, before the trainer). Returns what was done."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done: dict[str, Any] = {}
    if sp.on("liger"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # TRL's chunked LM head already avoids the logits, and TRL refuses Liger's fused cross-entropy
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        done["liger"] = True
    if sp.on("fast_lora"):
        done["fast_lora_modules"] = patch_lora(model, fuse_dora=sp.on("fast_dora"))
    if sp.on("fast_dora"):
        done["fast_dora_modules"] = patch_dora(model)
        track_forward_passes(model)
    done["checkpointed_layers"] = set_checkpointing(base, sp.checkpointed_layers)
    return done


def set_checkpointing(base: Any, layers: int) -> int:
    """Non-reentrant gradient checkpointing on the first ``layers`` decoder layers, none on the others."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers <= 0:  # also undoes prepare_model_for_kbit_training's blanket enable
        for m in base.modules():
            if isinstance(getattr(m, "gradient_checkpointing", None), bool):
                m.gradient_checkpointing = False
        return 0
    kw = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    for i, m in enumerate(blocks):
        m.gradient_checkpointing = i < layers
    return sum(bool(m.gradient_checkpointing) for m in blocks)


def after_trainer(trainer: Any, sp: SpeedPlan) -> int:
    """Undo TRL's bf16 cast of a quantized model's adapters (before the optimizer exists); returns #params."""
    import torch

    n = 0
    if sp.on("fp32_adapters"):
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
                n += 1
    return n


# ------------------------------------------------------------------------------------------------ LoRA

def patch_lora(model: Any, fuse_dora: bool = False) -> int:
    """Give every PEFT LoRA Linear / Linear4bit the fused forward; returns how many were patched.

    ``fuse_dora``: DoRA layers (without dropout) take the fused path too, as scale * (base + s * B A x).
    """
    from peft.tuners.lora import LoraLayer

    n = 0
    for m in model.modules():
        if isinstance(m, LoraLayer) and type(m).__name__ in ("Linear", "Linear4bit") and "_tk_forward" not in vars(m):
            m._tk_forward = m.forward  # the bound original, for every case the fast path does not cover
            m._tk_fuse_dora = fuse_dora
            m.forward = types.MethodType(_fast_lora_forward, m)
            n += 1
    return n


def _fast_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return self._tk_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    dora = None
    if name in getattr(self, "lora_variant", {}) or self.use_dora.get(name):
        dora = _fusable_dora(self, name)
        if dora is None:
            return self._tk_forward(x, *args, **kwargs)
    if name not in self.lora_A:
        return self._tk_forward(x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if lora_B.bias is not None or lora_A.bias is not None:
        return self._tk_forward(x, *args, **kwargs)
    if dora is not None or type(self).__name__ == "Linear4bit":
        from . import nf4

        out = nf4.lora_forward(self, x, name, dora)
        if out is not None:
            return out
    result = self.base_layer(x)
    if not torch.is_autocast_enabled(x.device.type):
        # (under autocast the matmul casts to 16-bit anyway: an fp32 copy of x would cost a pass and memory)
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
    h = lora_A(self.lora_dropout[name](x))
    w, s = lora_B.weight, self.scaling[name]
    if not torch.is_autocast_enabled(result.device.type) and not (h.dtype == w.dtype == result.dtype):
        if dora is not None:
            return self._tk_forward(x, *args, **kwargs)
        # mixed dtypes without autocast: PEFT's own promotion rules apply
        return (result + lora_B(h) * s).to(result.dtype)
    # base + s * B(A(x)) in the GEMM's epilogue: no separate scale, add or (QLoRA) defensive clone
    y = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), w.t(), alpha=s)
    if dora is not None:
        # PEFT's base + (m/n - 1) * base + (m/n) * s * lora is (m/n) * (base + s * lora) = y + y * (m/n - 1);
        # (m/n - 1) is small, so it is formed in fp32 before going to the activations' dtype
        norm = dora_weight_norm(dora, self.get_base_layer(), lora_A.weight, w, s)
        y = torch.addcmul(y, y, (dora.weight / norm - 1).to(y.dtype).view(1, -1))
    return y.view(result.shape).to(result.dtype)


def _fusable_dora(layer: Any, name: str) -> Any:
    """The DoRA magnitude layer when the fused path computes exactly PEFT's DoRA forward, else None."""
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    mags = getattr(layer, "lora_magnitude_vector", None)
    if not getattr(layer, "_tk_fuse_dora", False) or mags is None or name not in mags:
        return None
    mag = mags[name]
    if type(mag) is not DoraLinearLayer or mag.fan_in_fan_out or getattr(layer.get_base_layer(), "bias", None) is not None:
        return None
    if layer.training and not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None  # PEFT's DoRA applies dropout to its base term too
    return mag


# ------------------------------------------------------------------------------------------------ DoRA

def track_forward_passes(model: Any) -> dict:
    """Count forward passes of the decoder (a pre-hook on the backbone, which the checkpoint recompute does
    not re-enter) and hand the counter to every DoRA layer: its weight norm is recomputed once per pass.

    Parameter version counters cannot key that cache: bitsandbytes' optimizers update weights in their own
    kernels, which do not bump them.
    """
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None) or base
    gen = {"passes": 0}

    def bump(module: Any, args: Any) -> None:
        gen["passes"] += 1

    backbone.register_forward_pre_hook(bump)
    for m in model.modules():
        if type(m) is DoraLinearLayer:
            m._tk_gen = gen
    # the LoRA layers whose DoRA values nf4.py computes together, once per pass
    gen["nf4_dora"] = [(m, n) for m in model.modules() if isinstance(getattr(m, "lora_magnitude_vector", None),
                                                                     torch.nn.ModuleDict)
                       for n, mag in m.lora_magnitude_vector.items() if type(mag) is DoraLinearLayer]
    return gen


def patch_dora(model: Any) -> int:
    """Give every DoRA linear layer the cached-norm forward; returns how many were patched."""
    from peft.tuners.lora.dora import DoraLinearLayer

    n = 0
    for m in model.modules():
        if type(m) is DoraLinearLayer and not m.fan_in_fan_out and "_tk_forward" not in vars(m):
            m._tk_forward = m.forward
            m.forward = types.MethodType(_fast_dora_forward, m)
            n += 1
    return n


def dora_weight_norm(layer: Any, base_layer: Any, A: Any, B: Any, scaling: float) -> Any:
    """||W_i + s (B A)_i|| per output row, fp32, without materialising W + s B A.

    ||W_i||^2 + 2 s <W_i A^T, B_i> + s^2 B_i (A A^T) B_i^T: ||W||^2 is cached (W is frozen), the rest needs
    W A^T (out x r). With a pass counter (`track_forward_passes`) the value is computed once per forward
    pass and reused by that pass's checkpoint recompute; without one it is computed on every call.
    """
    import torch
    from peft.utils.integrations import dequantize_module_weight

    gen = layer.__dict__.get("_tk_gen")
    key = None if gen is None else (gen["passes"], A.data_ptr(), B.data_ptr(), A.dtype, B.dtype, float(scaling))
    cached = layer.__dict__.get("_tk_norm")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        W = dequantize_module_weight(base_layer)
        wkey = (base_layer.weight.data_ptr(), W.shape)
        wsq = layer.__dict__.get("_tk_wsq")
        if wsq is None or wsq[0] != wkey:
            wsq = (wkey, W.float().pow(2).sum(1))
            layer._tk_wsq = wsq
        WA = W @ A.to(W.dtype).t()  # out x r, one pass over W
        norm = dora_norm(wsq[1], WA, A, B, scaling)
    layer._tk_norm = (key, norm)
    return norm


def dora_norm(wsq: Any, WA: Any, A: Any, B: Any, s: float) -> Any:
    """||W_i + s (B A)_i|| in fp32 from ||W_i||^2 (``wsq``) and W A^T (``WA``): ||W_i||^2 + 2 s <W_i A^T, B_i>
    + s^2 B_i (A A^T) B_i^T. Also batched: leading dimensions of all arguments are layers."""
    import torch

    A, B = A.float(), B.float()
    M = torch.add(WA.float(), B @ (A @ A.transpose(-1, -2)), alpha=s / 2)  # W A^T + (s/2) B A A^T
    return (wsq + (2 * s) * (M * B).sum(-1)).clamp_min_(0).sqrt_()


def _fast_dora_forward(self: Any, x: Any, *, lora_A: Any, lora_B: Any, scaling: float, base_layer: Any,
                       base_result: Any = None, adapter_name: str = "default") -> Any:
    import torch.nn.functional as F
    from peft.utils.integrations import dequantize_module_weight

    norm = dora_weight_norm(self, base_layer, lora_A.weight, lora_B.weight, scaling)
    scale = self.weight / norm  # magnitude (trainable) / detached norm, fp32
    lora_result = lora_B(lora_A(x))
    if base_result is None:  # dropout active: the base output of the un-dropped input is not available
        base_result = F.linear(x, dequantize_module_weight(base_layer).to(x.dtype))
    elif base_layer.bias is not None:
        base_result = base_result - base_layer.bias
    # (scale - 1) is formed in fp32 (it is small), then both factors go to the activations' dtype
    dt = base_result.dtype
    return (scale - 1).to(dt).view(1, -1) * base_result + (scale * scaling).to(dt).view(1, -1) * lora_result.to(dt)
