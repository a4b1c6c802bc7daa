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
  offload      long context (longctx.py): the saved input of the first N checkpointed layers (one hidden state
               each, all that checkpointing keeps of a layer) waits in pinned host memory for its recompute,
               when the run does not fit with every layer checkpointed (CUDA only); N from the memory budget,
               bounded by the host's memory.
  tiled_mlp    long context (longctx.py): the MLP over token tiles, each recomputed in backward, so the
               [tokens, intermediate] activations are never whole; when offload alone is not enough, and only
               without adapter dropout (tiles would draw other masks than the untiled MLP).
  varlen_attention  packed SFT rows (CUDA): attention per packed example with torch's varlen flash attention
               instead of sdpa over the whole packed row under a block-diagonal mask (varlen.py). Decided by
               train() once packing is (the plan may leave it to the tokenized rows), from `disabled` too.
  recompute_norms  a layer not checkpointed keeps the inputs of its two RMSNorms (they do anyway) but not their
               outputs: backward computes those again (recompute.py; exact, one pass over [tokens, hidden] each), so
               each such layer keeps two [tokens, hidden] tensors less and the budget checkpoints fewer layers.
  recompute_mlp  with recompute_norms, a layer between the checkpointed and the kept ones computes its MLP's gate/up
               outputs again in backward instead of keeping them (recompute.py; exact): half of what it keeps, for
               two of its seven GEMMs again where checkpointing it runs the whole layer again. The plan mixes the
               three kinds (checkpointed, MLP recomputed, kept) for the least recompute that fits the budget.
  offload_mlp  (CUDA) of those layers, as many as the host link serves while the forward runs send their gate/up
               outputs to pinned host memory and get them back one layer ahead in backward, on side streams,
               instead of recomputing them (recompute.py; exact). The same GPU memory as recomputing; the count is
               measured on the GPU when the run starts (kernels.apply records it).
  fp32_adapters not a speed-up but a numerics guard: TRL casts a quantized model's LoRA A/B to bf16, where
               AdamW steps of lr ~2e-4 are partly rounded away (the loss curve lags the plain recipe's, which
               keeps PEFT's fp32 adapters); they go back to fp32 (autocast still runs the matmuls in bf16).

`provider_options.local.speedups` turns them off for diagnosis and benchmarks ("off", or ["-liger", "-fast_dora"]);
the plan records the value with the run (`disabled` reads it), so a resumed worker makes the same choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import variants as _variants
from .memory import HEADROOM, MLP_TILE_TOKENS, GiB, _dims, _linear_shapes, kept_layers_peak

OPTIMISATIONS = ("liger", "bf16_kbit", "fast_lora", "fast_dora", "checkpointing", "fp32_adapters", "offload",
                 "tiled_mlp", "varlen_attention", "recompute_norms", "recompute_mlp", "offload_mlp")
OFF_BY = "disabled by provider_options.local.speedups"
# a tile's LoRA dropout masks are drawn per tile: other draws than the untiled MLP's, so not the same training
TILE_DROPOUT = ("not used with adapter.dropout={} (its masks would be drawn per tile, unlike the untiled run's); "
                "adapter.dropout=0 allows it")
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
    offload_layers: int = 0  # checkpointed layers (the first ones) whose saved input is offloaded to host memory
    mlp_tile_tokens: int = 0  # tiled MLP: tokens per tile; 0 = untiled
    host_bytes: int = 0  # pinned host memory the offload takes
    longest_length: int | None = None  # nothing fits: the longest power-of-two max_length that does (0: none)
    longest_length_hint: str = ""  # then the first suggestion of the refusal (resolve.py puts it there)
    mlp_recompute_layers: int = 0  # the layers after the checkpointed ones that recompute their gate/up outputs
    # the layer split when every row turns out to have one length (no padding, so no attention mask; the plan
    # assumes padded rows until the worker has tokenized them): {"checkpointed_layers", "mlp_recompute_layers",
    # "memory_estimate_bytes", "reason"}; None when it is the same split
    unpadded: dict | None = None

    def on(self, name: str) -> bool:
        return bool(self.enabled.get(name))

    def summary(self) -> str:
        on = [k for k, v in self.enabled.items() if v and k != "checkpointing"]
        ck = (f"checkpointing {self.checkpointed_layers}/{self.num_layers} layers" if self.checkpointed_layers
              else "no checkpointing")
        if self.mlp_recompute_layers:
            ck += f", MLP recomputed in {self.mlp_recompute_layers}"
        out = f"speed-ups: {', '.join(on) or 'none'}; {ck} ({self.reasons.get('checkpointing', '')})"
        long = [f"{k}: {self.reasons[k]}" for k in ("offload", "tiled_mlp") if self.enabled.get(k)]
        return "; ".join([out, *long, *self.notes])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_unpadded(self) -> "SpeedPlan":
        """This plan for rows of one length (`unpadded`), or itself."""
        u = self.unpadded
        if not u:
            return self
        ckpt, mlps = u["checkpointed_layers"], u["mlp_recompute_layers"]
        return replace(self, checkpointed_layers=ckpt, mlp_recompute_layers=mlps,
                       memory_estimate_bytes=u["memory_estimate_bytes"], unpadded=None,
                       enabled={**self.enabled, "checkpointing": ckpt > 0, "recompute_mlp": mlps > 0,
                                "offload_mlp": u.get("offload_mlp", False)},
                       reasons={**self.reasons, "checkpointing": u["reason"], "recompute_mlp": u["recompute_mlp"]})


def estimate_kwargs(spec: Any, cfg: dict[str, Any] | None = None, device_type: str = "cpu",
                    off: frozenset[str] = frozenset()) -> dict[str, Any]:
    """memory.estimate arguments describing the path train() really takes (fused LM head, bf16 QLoRA, and
    on CUDA Liger's kernels with the fused LoRA forward, which keep fewer activations per layer)."""
    fused = bool(cfg) and liger_support(cfg, device_type)[0] and not {"liger", "fast_lora"} & off
    return {"fused_lm_head": spec.method == "sft", "kbit_upcast": "bf16_kbit" in off, "fused_kernels": fused,
            "fused_mlp": fused, "recompute_norms": "recompute_norms" not in off, "lora_dropout": spec.adapter.dropout,
            "optimizer_state_bytes": 8}  # AdamW's fp32 state, QLoRA too (resolve.optimizer_name)


def liger_support(cfg: dict[str, Any], device_type: str) -> tuple[bool, str]:
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
    max_length: int | None = None,
) -> SpeedPlan:
    """Decide the speed-ups of one run.

    ``estimate(gradient_checkpointing: bool, **kw) -> MemoryEstimate`` is train()'s estimator for the resolved
    quantization (``kw``: memory._estimate's offload_layers, tiled_mlp, max_length); with ``auto_checkpointing``
    (the caller did not force it) and a known ``budget_bytes``, it decides how many layers need checkpointing.
    When the run does not fit even with every layer checkpointed, the long-context means are turned on from the
    budget (`_long_context`). ``device_type`` is "cuda" or "cpu"; ``off`` is `disabled(...)`; ``max_length``
    the run's (for the longest length that fits when nothing does).
    """
    cuda = device_type == "cuda"
    en: dict[str, bool] = {}
    why: dict[str, str] = {}

    def decide(name: str, ok: bool, reason: str) -> None:
        en[name] = ok and name not in off
        why[name] = OFF_BY if (ok and name in off) else reason

    liger_ok, liger_why = liger_support(cfg, device_type)
    decide("liger", liger_ok, liger_why)
    decide("bf16_kbit", quantized, "QLoRA: embeddings/LM head/norms stay bf16 (no fp32 upcast)" if quantized
           else "not quantized")
    decide("fast_lora", True, "LoRA update as one addmm epilogue")
    form = _variants.of(spec.adapter).form
    for name, (ok, reason) in form.speedups().items():  # DoRA's fused forward
        decide(name, ok, reason)
    notes = form.notes(spec.adapter)
    decide("recompute_norms", True, "the normed hidden states of layers not checkpointed are recomputed in "
           "backward, not kept")
    decide("recompute_mlp", en["recompute_norms"], "needs recompute_norms")
    decide("offload_mlp", cuda and en["recompute_mlp"], "the gate/up outputs of some MLP-recomputing layers in "
           "host memory instead (how many: measured when the run starts)" if cuda and en["recompute_mlp"]
           else "CUDA only" if not cuda else "needs recompute_mlp")
    decide("fp32_adapters", quantized, "QLoRA: adapters kept fp32 like PEFT's default (TRL casts them to bf16)"
           if quantized else "not quantized (adapters already fp32)")

    n = _layers(cfg)
    ckpt, mlps, est_bytes = (n if gradient_checkpointing else 0), 0, None
    known = bool(budget_bytes) and estimate is not None and n > 0
    full = estimate(True) if gradient_checkpointing and known else None
    long = LongContext()
    if not gradient_checkpointing:
        why["checkpointing"] = "off" + (" (CPU: tiny models train faster without)" if not cuda else "")
    elif full is not None and full.fits is False:  # even every layer checkpointed does not fit: long context
        long = _long_context(n, estimate, can_offload=cuda and "offload" not in off,
                             can_tile="tiled_mlp" not in off and not spec.adapter.dropout, max_length=max_length)
        est_bytes = long.estimate_bytes
        why["checkpointing"] = f"all layers (with every layer checkpointed ~{full.total_bytes / GiB:.1f} GiB " \
                               f"does not fit {budget_bytes / GiB:.1f} GiB)"
    elif "checkpointing" in off or not auto_checkpointing or not known:
        why["checkpointing"] = ("all layers (" + (OFF_BY if "checkpointing" in off
                                                   else "requested" if not auto_checkpointing
                                                   else "no memory budget known") + ")")
    else:
        mlp = estimate(False, recompute_mlp=True) if en["recompute_mlp"] else None
        if mlp is not None and not mlp.assumptions.get("recompute_mlp"):
            why["recompute_mlp"], mlp = "not on this path (the fused kernels, without adapter dropout)", None
        ckpt, mlps, est_bytes, why["checkpointing"] = _checkpoint_layers(n, budget_bytes, full, estimate(False), mlp,
                                                                         _mlp_share(cfg, max_length))
    en["checkpointing"] = ckpt > 0
    en["offload_mlp"] = en["offload_mlp"] and mlps > 0
    if en["recompute_mlp"]:
        en["recompute_mlp"] = mlps > 0
        if mlps:
            why["recompute_mlp"] = f"the gate/up outputs of {mlps} layers (after the checkpointed ones) recomputed " \
                                   f"in backward, not kept"
        elif why["recompute_mlp"] == "needs recompute_norms":
            why["recompute_mlp"] = "not used by this plan (each layer is either checkpointed or kept)"
    for name, on, reason in (("offload", long.offload_layers > 0, long.offload_why),
                             ("tiled_mlp", long.tiled, long.tiled_why)):
        en[name] = on
        why[name] = reason or (OFF_BY if name in off else "CUDA only (host memory is the device's)"
                               if name == "offload" and not cuda else TILE_DROPOUT.format(spec.adapter.dropout)
                               if name == "tiled_mlp" and spec.adapter.dropout else "not needed: the run fits without it")
    tile_blocked = bool(spec.adapter.dropout) and "tiled_mlp" not in off
    return SpeedPlan(en, why, n, ckpt, est_bytes, notes, offload_layers=long.offload_layers,
                     mlp_tile_tokens=MLP_TILE_TOKENS if long.tiled else 0, host_bytes=long.host_bytes,
                     longest_length=long.longest_length, longest_length_hint=_length_hint(long, tile_blocked),
                     mlp_recompute_layers=mlps)


def _length_hint(long: "LongContext", tile_blocked: bool) -> str:
    """The first suggestion of a run that does not fit even with every long-context means the plan could use."""
    if long.longest_length is None:
        return ""
    more = "; adapter.dropout=0 would allow the tiled MLP" if tile_blocked else ""
    if not long.longest_length:
        return f"no max_length of 128 tokens or more fits this device with {long.means}: use a device with more " \
               f"memory{more}"
    return (f"set hyperparameters.max_length to {long.longest_length} or less: the longest power-of-two length "
            f"that fits this device with {long.means}{more}")


@dataclass
class LongContext:
    """What `_long_context` chose (nothing by default)."""

    offload_layers: int = 0
    tiled: bool = False
    estimate_bytes: int | None = None
    host_bytes: int = 0
    offload_why: str = ""
    tiled_why: str = ""
    longest_length: int | None = None  # nothing fits at this length: the longest power of two that does (0: none)
    means: str = ""  # then: the means that were not enough


def _fewest_offloaded(n: int, estimate: Any, tiled: bool, offload: bool, **kw: Any) -> Any:
    """The estimate with the fewest offloaded layers (0..n, or 0 without offload) that fits (GPU and host), or
    None. GPU memory falls and host memory grows with the count, so the GPU-fitting counts are a suffix:
    bisect for its start, where the host need is least."""
    def at(k: int) -> Any:
        return estimate(True, offload_layers=k, tiled_mlp=tiled, **kw)

    lo, hi = 0, (n if offload else 0)
    if not at(hi).device_fits:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid).device_fits:
            hi = mid
        else:
            lo = mid + 1
    e = at(lo)
    return e if e.fits else None


def _long_context(n: int, estimate: Any, *, can_offload: bool, can_tile: bool, max_length: int | None) -> LongContext:
    """Offload first (it costs a copy per layer), then the tiled MLP as well (it recomputes the MLP), each only
    as far as the budget needs; when nothing fits, the longest power-of-two max_length that fits with every
    means on."""
    tries = [(False, True)] if can_offload else []  # (tiled, offload)
    if can_tile:
        tries.append((True, can_offload))
    for tiled, offload in tries:
        e = _fewest_offloaded(n, estimate, tiled, offload)
        if e is None:
            continue
        k = e.assumptions.get("offload_layers", 0)
        fit = f"~{e.total_bytes / GiB:.1f} GiB fits {e.device_bytes / GiB:.1f} GiB"
        return LongContext(
            offload_layers=k, tiled=tiled, estimate_bytes=e.total_bytes, host_bytes=e.host_bytes,
            offload_why=(f"the saved inputs of {k} of {n} checkpointed layers in pinned host memory "
                         f"({e.host_bytes / GiB:.1f} GiB) so that {fit}") if k else "",
            tiled_why=f"MLP over {MLP_TILE_TOKENS}-token tiles so that {fit}" if tiled else "")
    means = " and ".join(m for m, ok in (("activation offload", can_offload), ("tiled MLP", can_tile)) if ok)
    longest = 0
    if max_length:
        p = 1 << (max_length - 1).bit_length()  # the powers of two below max_length, longest first
        while (p := p // 2) >= 128:
            if _fewest_offloaded(n, estimate, can_tile, can_offload, max_length=p) is not None:
                longest = p
                break
    means = means or "every layer checkpointed"
    why = f"not enough even with {means}"
    return LongContext(offload_why=why if can_offload else "", tiled_why=why if can_tile else "",
                       longest_length=longest, means=means)


def _checkpoint_layers(n: int, budget: int, full: Any, none: Any, mlp: Any = None,
                       mlp_share: float = 1.0) -> tuple[int, int, int, str]:
    """(checkpointed layers, MLP-recomputing layers after them, estimated peak, why): the least recompute whose
    estimated peak fits the budget (the same headroom as the fit check). A checkpointed layer costs one layer's
    forward again, a recomputed MLP ``mlp_share`` of it (`_mlp_share`), a kept layer nothing; the peaks are
    memory.kept_layers_peak's, from the all-checkpointed (``full``), no-checkpointing (``none``) and (``mlp``, None
    without recompute_mlp) every-layer-recomputing-its-MLP estimates."""
    limit = HEADROOM * budget

    def peak(keep: int, m: int) -> int:
        return kept_layers_peak(full, none, n, keep, mlp=mlp, mlp_layers=m)

    best = (float(n), n, 0)  # (cost, checkpointed, MLP-recomputing): all checkpointed when nothing fits
    for keep in range(n, -1, -1):
        # recomputing an MLP costs less than checkpointing its layer: as many as fit, of the layers not kept
        m = next((m for m in range(n - keep if mlp is not None else 0, -1, -1) if peak(keep, m) <= limit), None)
        if m is not None and (n - keep - m) + m * mlp_share < best[0]:
            best = ((n - keep - m) + m * mlp_share, n - keep - m, m)
    _, ckpt, mlps = best
    est = peak(n - ckpt - mlps, mlps)
    per_layer = (none.total_bytes - kept_layers_peak(full, none, n, 1)) / max(1, n - 1)
    more = f", the MLP's gate/up outputs of {mlps} more recomputed," if mlps else ""
    if ckpt == 0 and mlps == 0:
        reason = f"not needed: ~{none.total_bytes / GiB:.1f} GiB without it fits {budget / GiB:.1f} GiB"
    elif est > limit:  # the fit check refuses the run
        reason = f"all {n} layers, and ~{est / GiB:.1f} GiB still exceeds {budget / GiB:.1f} GiB"
    else:
        reason = (f"{ckpt} of {n} layers{more} so that ~{est / GiB:.1f} GiB fits {budget / GiB:.1f} GiB "
                  f"(~{per_layer / GiB:.2f} GiB per un-checkpointed layer)")
    return ckpt, mlps, est, reason


def _mlp_share(cfg: dict[str, Any], max_length: int | None) -> float:
    """A recomputed MLP's gate/up GEMMs as a share of a layer's forward (its linear layers and attention's two
    S x S products, causal: ~2 S x q-width FLOPs per token). 8B at 2,048 tokens: 0.52."""
    d = _dims(cfg)
    layer = sum(a * b for a, b in _linear_shapes(d)) + (max_length or 0) * d["heads"] * d["head_dim"]
    return 2 * d["hidden"] * d["intermediate"] / layer


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
