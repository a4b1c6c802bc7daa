"""Peak-memory estimate of a LoRA / QLoRA training step, and the fit check that refuses early.

Pure arithmetic over the base model's config.json (no torch). The model of a step:

  weights      frozen base: bf16/fp32 bytes per parameter, or NF4 (4.127 bits with double quant) for the
               decoder's linear layers; with QLoRA, `prepare_model_for_kbit_training` upcasts everything
               not quantized (embeddings, lm_head, norms) to fp32.
  adapter      trainable LoRA params: weight + grad (fp32) + optimizer state (AdamW: 8 B, 8-bit paged: 2 B).
  activations  with gradient checkpointing: each layer's input hidden state, plus one layer's full
               activations being recomputed (`kept_layers_peak`: only while no layer keeps its own);
               without it: every layer's full activations, or those less the MLP's gate/up outputs for a layer
               that recomputes them (recompute.py; `kept_layers_peak` mixes the three kinds of layers). Plus the logits
               (B*S*V) with their fp32 loss copies and gradient, which dominate at 128k vocab.
               QLoRA's fp32 embeddings/norms make the hidden stream fp32 (hence a larger factor).
  overhead     CUDA context + allocator fragmentation (not in torch's max_memory_allocated).

Calibration against the plain recipe's H200 figures (docs/benchmarks.md, "Reference figures"; Llama-3.1-8B
shape, seq 2048 x micro-batch 4, r=16 all-linear); compared is weights+adapter+activations with
torch.cuda.max_memory_allocated:
  QLoRA + checkpointing        estimate 26.96 GiB   measured 27.3 GiB   (-1.2%)
  bf16 LoRA + checkpointing    estimate 31.70 GiB   measured 31.3 GiB   (+1.3%)
  bf16 LoRA, no checkpointing  estimate 103.3 GiB   measured 104.7 GiB  (-1.3%)
  QLoRA, no checkpointing      estimate 133.4 GiB, 140.8 with overhead > 139 GiB: refused; measured: OOM
(tests/test_local_memory.py recomputes these.) Other architectures (MoE, very wide attention) are
only approximated; the estimate errs on the high side on purpose.

tunekit's fused CUDA path (Liger + fused LoRA forward, bf16 QLoRA, TRL's chunked head, the last layers
un-checkpointed) is counted from what its kernels save, with no fitted factor (`_fused_layer_elems`, the
head and DoRA terms in `_estimate`, `kept_layers_peak`). Against every H200 peak of today's code (e.g. QLoRA
4 x 2048 at 27/32 checkpointed layers 13.27 vs 13.22 GiB; bf16 LoRA 50.14 vs 50.16; bf16 at 16,384 tokens,
held out, 84.44 vs 84.6): within 0.4% (two held-out runs of older code +3.9% and +9%), the table of
`python benchmarks/memory_estimate.py` (docs/benchmarks.md). LoRA dropout and DoRA with dropout are counted
(checked on CPU against what autograd saves), not yet measured on the GPU.
Attention (attention.py), counted where it exists: the [rows, 1, S, S] boolean mask of padded or packed
rows and what SDPA makes of it (``attention_mask``), and the S x S scores of a kernel that materialises them
(``attention_scores``: SDPA's math kernel, which the plain recipe's fp32 q/k/v with grouped KV heads fall to).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._exceptions import ResourceError
from . import suggest as _suggest
from .attention import attention_terms
from .variants import form_of

GiB = 1024**3

NF4_BYTES_PER_PARAM = 4.127 / 8  # NF4 + double-quantized absmax (block 64)
# Per token per layer, the saved activation elements are ~ H_COEF*hidden + I_COEF*intermediate
# (attention inputs/outputs, RoPE copies, RMSNorm fp32 temporaries, LoRA inputs, MLP gate/up/act).
H_COEF = 24
I_COEF = 4
# Bytes per logit element over the step: the logits themselves + fp32 upcast/log-softmax/gradient.
LOGIT_BYTES = {"bf16": 12, "fp32_head": 12, "fp32": 16}
# TRL's chunked LM head (trl.trainer.utils.add_fused_lm_head): token x vocabulary tile of the logits
FUSED_HEAD_TILE = (4096, 32768)
# bitsandbytes' 4-bit block: one fp32 scale per NF4_BLOCK weights once double quantization is undone (nf4.py)
NF4_BLOCK = 64
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# FSDP2: full decoder layers resident on a rank besides its shard (the computing one + the prefetched one)
SHARDED_LAYERS = 2
FRAGMENTATION = 0.05  # allocator slack, fraction of the allocated peak
HEADROOM = 0.92  # a plan "fits" when its total is within this share of the device memory
# Long context (longctx.py). Activation offload: an offloaded checkpointed layer's saved input (one hidden state)
# waits in pinned host memory for its recompute; the GPU holds the one being brought back. CUDA's pinned-memory
# allocator rounds each block up to a power of two.
OFFLOAD_RESIDENT_STATES = 1
# Tiled MLP: the MLP runs over tiles of this many tokens, so its [tokens, intermediate] activations (the
# gate/up/SwiGLU outputs) exist for one tile at a time
MLP_TILE_TOKENS = 8192
# share of the host's physical memory the offloaded states may pin (pinned pages cannot be swapped out, and the
# weights pass through host memory while loading)
HOST_SHARE = 0.75


@dataclass
class MemoryEstimate:
    total_bytes: int
    breakdown: dict[str, int]
    fits: bool | None
    device_bytes: int | None
    suggestions: list[str] = field(default_factory=list)
    assumptions: dict[str, Any] = field(default_factory=dict)
    host_bytes: int = 0  # pinned host memory of the activation offload (not in total_bytes)
    host_memory_bytes: int | None = None  # the host's physical memory the check assumed

    def summary(self) -> str:
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.breakdown.items())
        host = f"; host (offloaded activations) {human_bytes(self.host_bytes)}" if self.host_bytes else ""
        return f"~{human_bytes(self.total_bytes)} ({parts}){host}"

    @property
    def device_fits(self) -> bool | None:
        """Whether the total is within HEADROOM of the device's memory (None: the device is unknown)."""
        return None if not self.device_bytes else self.total_bytes <= HEADROOM * self.device_bytes

    @property
    def host_fits(self) -> bool:
        """Whether the offloaded activations fit HOST_SHARE of the host's memory (unknown host: assumed yes)."""
        return not self.host_bytes or not self.host_memory_bytes or self.host_bytes <= HOST_SHARE * self.host_memory_bytes


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def read_model_config(base_model: str | Path) -> dict[str, Any] | None:
    """config.json of a local model dir as a dict (None when it is not a local dir)."""
    p = Path(base_model) / "config.json"
    if p.is_file():
        return json.loads(p.read_text())
    return None


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    # multimodal configs nest the language model's config
    return cfg.get("text_config") or cfg


def _dims(cfg: dict[str, Any]) -> dict[str, int]:
    c = _text_config(cfg)
    h = int(c.get("hidden_size") or c.get("n_embd") or c["d_model"])
    heads = int(c.get("num_attention_heads") or c.get("n_head"))
    hd = int(c.get("head_dim") or h // heads)
    return {
        "hidden": h,
        "intermediate": int(c.get("intermediate_size") or c.get("n_inner") or 4 * h),
        "layers": int(c.get("num_hidden_layers") or c.get("n_layer")),
        "heads": heads,
        "kv_heads": int(c.get("num_key_value_heads") or heads),
        "head_dim": hd,
        "vocab": int(c["vocab_size"]),
        "tied": bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
    }


def _linear_shapes(d: dict[str, int]) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder block (Llama-style: q k v o gate up down)."""
    h, i, q, kv = d["hidden"], d["intermediate"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def _fused_layer_elems(d: dict[str, int], r: int, dora16: bool = False, fused_mlp: bool = False) -> int:
    """Elements per token one decoder layer keeps for backward on the fused CUDA path (Liger's RMSNorm/SwiGLU/RoPE,
    the fused LoRA forward, SDPA's flash kernel), counted from what each op saves:
      4 hidden         the layer input and mid-layer residual (RMSNorm inputs), both normed outputs (the
                       shared input of q/k/v and of gate/up)
      2 q + 2 kv       q, k, v (SDPA inputs; RoPE rotates in place) and the attention output (o_proj's input)
      3 intermediate   gate and up outputs (SwiGLU inputs) and the SwiGLU output (down_proj's input)
      7 r              A x of each adapted linear
    8B shape: 69,744, i.e. 0.448 x the plain recipe's coefficients (H200, 72a9a4c: 50.16 GiB measured for bf16
    LoRA without checkpointing). ``dora16``: the 16-bit DoRA forward (kernels.py) rescales each output with
    addcmul, which saves it too (counted, not measured). ``fused_mlp``: down_proj takes the SwiGLU's inputs
    (kernels.fuse_swiglu_down), so its output is not kept: 2 intermediate."""
    h, i, q, kv = d["hidden"], d["intermediate"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    elems = 4 * h + 2 * q + 2 * kv + (2 if fused_mlp else 3) * i + 7 * r
    return elems + (q + 2 * kv + 2 * h + 2 * i if dora16 else 0)


def _dropout_bytes(d: dict[str, int], target_modules: Any, act_bytes: int, mask_bytes: int) -> int:
    """Bytes per token and layer that LoRA dropout adds: each adapted linear's branch keeps its own dropped copy
    of its input and the mask (1 byte from CUDA's fused dropout, the input's dtype on CPU); with all-linear the
    inputs it then no longer keeps (the two normed hidden states, the SwiGLU output) are freed. All-linear 8B
    on CUDA: 38,912 elements at 3 bytes less 22,528 at 2, +0.51x a fused layer (tests/test_local_memory.py
    counts what autograd saves on CPU)."""
    extra = sum(i for i, _ in _adapted(d, target_modules)) * (act_bytes + mask_bytes)
    if target_modules == "all-linear":
        extra -= (2 * d["hidden"] + d["intermediate"]) * act_bytes
    return extra


def count_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameter counts: 'linear' (decoder linears, quantizable), 'other' (embeddings, head, norms)."""
    d = _dims(cfg)
    linear = d["layers"] * sum(a * b for a, b in _linear_shapes(d))
    emb = d["vocab"] * d["hidden"] * (1 if d["tied"] else 2)
    norms = d["layers"] * 2 * d["hidden"] + d["hidden"]
    return {"linear": linear, "other": emb + norms, "total": linear + emb + norms}


def _adapted(d: dict[str, int], target_modules: Any) -> list[tuple[int, int]]:
    """(in, out) of the adapted linears of one block: all-linear, or the named Llama-style modules."""
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shapes = dict(zip(names, _linear_shapes(d)))
    chosen = names if target_modules == "all-linear" else [n for n in names if n in set(target_modules)] or names
    return [shapes[n] for n in chosen]


def lora_params(cfg: dict[str, Any], r: int, target_modules: Any = "all-linear", use_dora: bool = False) -> int:
    """Trainable LoRA parameters for all-linear (or the named Llama-style modules)."""
    d = _dims(cfg)
    form = form_of(use_dora)
    return d["layers"] * sum(form.trainable_params(r, i, o) for i, o in _adapted(d, target_modules))


def _estimate(
    model_config: dict[str, Any],
    *,
    micro_batch: int,
    max_length: int,
    quantization: str = "none",
    r: int = 32,
    target_modules: Any = "all-linear",
    use_dora: bool = False,
    gradient_checkpointing: bool = True,
    dtype: str = "bf16",
    optimizer_state_bytes: float | None = None,
    device_memory_bytes: int | None = None,
    n_params: int | None = None,
    method: str = "sft",
    device_type: str = "cuda",
    fused_lm_head: bool = False,
    kbit_upcast: bool = True,
    fused_kernels: bool = False,
    shards: int = 1,
    lora_dropout: float = 0.0,
    offload_layers: int = 0,
    tiled_mlp: bool = False,
    host_memory_bytes: int | None = None,
    attention_mask: str = "none",
    attention_scores: bool = False,
    fused_mlp: bool = False,
    recompute_norms: bool = False,
    recompute_mlp: bool = False,
) -> MemoryEstimate:
    """The estimate alone (no suggestions). ``quantization`` is the resolved mode ('nf4'|'none').

    ``shards``: the per-GPU share under FSDP2 over that many ranks (layout.py): the decoder's linear weights,
    the adapter, its gradients and optimizer state are split; each rank also holds the layers being gathered
    (SHARDED_LAYERS: the one computing and the one prefetched) and, unsharded, the embeddings, head and norms
    (the root unit stays gathered through the step). Activations are per rank and not split.

    ``fused_lm_head``: the loss is computed in vocabulary tiles (TRL's chunked LM head), so the logits are
    never whole. ``kbit_upcast``: QLoRA's non-quantized params are upcast to fp32 (speed.py's bf16_kbit
    path keeps them bf16). ``fused_kernels``: Liger's kernels and the fused LoRA forward (CUDA), which keep
    fewer activations per layer (`_fused_layer_elems`). ``lora_dropout``: the adapter's dropout (> 0 gives each
    adapted linear its own dropped copy of its input). ``fused_mlp``: with fused kernels, a 4-bit down_proj
    without dropout takes the SwiGLU's inputs (kernels.fuse_swiglu_down) and the SwiGLU's output is not kept.
    ``recompute_norms``: with fused kernels and no dropout, a layer not checkpointed recomputes its two normed
    hidden states in backward (recompute.py) instead of keeping them. ``recompute_mlp``: with recompute_norms, a layer
    not checkpointed also computes its MLP's gate/up outputs again in backward (recompute.py): the estimate of every
    layer doing that, which `kept_layers_peak` mixes with the other two kinds.

    Long context (longctx.py): ``offload_layers`` checkpointed layers keep their saved input in pinned host
    memory instead of on the GPU (``host_bytes``; the estimate does not fit when that exceeds HOST_SHARE of
    ``host_memory_bytes``); ``tiled_mlp`` runs the MLP over MLP_TILE_TOKENS-token tiles.
    """
    d = _dims(model_config)
    counts = count_params(model_config)
    if n_params and n_params > 0:  # measured count wins; keep the linear/other split proportional
        scale = n_params / counts["total"]
        counts = {k: int(v * scale) for k, v in counts.items()}
    nf4 = quantization == "nf4"
    wbytes = 4 if dtype == "fp32" else 2
    linear_bytes = NF4_BYTES_PER_PARAM if nf4 else wbytes
    other_bytes = (4 if kbit_upcast else 2) if nf4 else wbytes
    linear = counts["linear"] * linear_bytes
    if shards > 1:
        linear = linear / shards + min(SHARDED_LAYERS, d["layers"]) * linear / d["layers"]
    weights = linear + counts["other"] * other_bytes

    n_lora = lora_params(model_config, r, target_modules, use_dora)
    opt_b = optimizer_state_bytes if optimizer_state_bytes is not None else (2 if nf4 else 8)
    adapter = n_lora * (4 + 4 + opt_b) / shards

    tokens = micro_batch * max_length
    if method == "dpo":
        tokens *= 2  # chosen + rejected go through the model together (the reference pass keeps no graph)
    act_elem = d["hidden"] * H_COEF + d["intermediate"] * I_COEF
    up = nf4 and kbit_upcast
    hidden_bytes = 4 if (up or dtype == "fp32") else 2  # QLoRA: fp32 embeddings make the residual stream fp32
    layer_bytes = 3 if up else (4 if dtype == "fp32" else 2)  # QLoRA: mixed bf16 matmuls / fp32 stream
    cdt = 4 if dtype == "fp32" else 2  # compute dtype
    dora_peft = use_dora and lora_dropout > 0  # DoRA with dropout is not fused: PEFT's layer (kernels.py's norm)
    # (not under FSDP2: the gathered 4-bit weight has no quant state, so bitsandbytes' own forward runs)
    fused_mlp = fused_kernels and fused_mlp and nf4 and not lora_dropout and shards == 1
    recompute_norms = recompute_norms and fused_kernels and not lora_dropout  # with dropout, copies are kept instead
    recompute_mlp = recompute_mlp and recompute_norms  # its input is the recomputed normed state
    if fused_kernels:
        full_layer = tokens * _fused_layer_elems(d, r, use_dora and not nf4 and not dora_peft, fused_mlp) * layer_bytes
        if dora_peft:
            # it keeps, per adapted linear, the base output of the dropped input and the LoRA output (for the
            # magnitude's gradient) and, on a 4-bit base, the dequantized weight its F.linear needs for dL/dx
            adapted = _adapted(d, target_modules)
            full_layer += tokens * 2 * sum(o for _, o in adapted) * layer_bytes
            if nf4:
                full_layer += sum(i * o for i, o in adapted) * cdt
        elif nf4:  # nf4.py's function saves each call's fp32 block scales (one per NF4_BLOCK weights)
            full_layer += counts["linear"] / d["layers"] / NF4_BLOCK * 4
        if use_dora and nf4 and not dora_peft:
            # nf4.py's DoRA saves each adapted layer's output for the magnitude's gradient: v/gate/up outputs are
            # saved anyway (SDPA and SwiGLU keep them), o_proj's and down_proj's are extra, and so are q's and k's
            # (they return a copy for Liger's in-place RoPE, kernels.guard_dora_outputs); and it caches every 4-bit
            # weight's fp32 block scales (measured before the q/k copy: 14.36 GiB vs LoRA's 13.22, 27/32)
            full_layer += tokens * (2 * d["hidden"] + d["heads"] * d["head_dim"] + d["kv_heads"] * d["head_dim"]) \
                * layer_bytes
            weights += counts["linear"] / NF4_BLOCK * 4
    else:
        full_layer = tokens * act_elem * layer_bytes
    if tiled_mlp and tokens > MLP_TILE_TOKENS:  # the MLP's intermediates exist for one tile at a time
        mlp_elems = (2 if fused_mlp else 3) * d["intermediate"] if fused_kernels else I_COEF * d["intermediate"]
        full_layer -= (tokens - MLP_TILE_TOKENS) * mlp_elems * layer_bytes
    if lora_dropout > 0:  # the measured H200 figures are all without dropout; this term is counted on CPU
        full_layer += tokens * _dropout_bytes(d, target_modules, layer_bytes, 1 if device_type == "cuda" else cdt)
    kept_layer = full_layer  # a layer not checkpointed; full_layer is also the one recomputed in backward
    if recompute_norms:  # recompute.py: its two normed outputs are not kept
        kept_layer -= tokens * 2 * d["hidden"] * layer_bytes
    # recompute.py: nor the gate/up outputs; the first such layer's backward computes both again on top
    mlp_again = tokens * 2 * d["intermediate"] * layer_bytes if recompute_mlp else 0
    kept_layer -= mlp_again
    if gradient_checkpointing:
        acts = d["layers"] * tokens * d["hidden"] * hidden_bytes + full_layer
    else:
        acts = d["layers"] * kept_layer
    state = tokens * d["hidden"] * hidden_bytes  # one layer's saved input
    offloaded = min(offload_layers, d["layers"]) if gradient_checkpointing else 0
    if offloaded:  # those inputs wait in host memory; the one being recomputed is back on the GPU
        acts -= (offloaded - OFFLOAD_RESIDENT_STATES) * state
    host = offloaded * _pow2_ceil(int(state))
    logit_bytes = LOGIT_BYTES["fp32" if dtype == "fp32" else ("fp32_head" if up else "bf16")]
    if fused_lm_head:
        # TRL's ChunkedLogProbFunction at the start of backward (every kept layer's activations still held): one
        # FUSED_HEAD_TILE of logits in the compute dtype, the fp32 gradient of the hidden states it scores, their
        # gathered copy (hidden[mask]) and the final norm's input; an fp32 head (QLoRA's upcast) also casts
        # each tile's weight rows and hidden states to the compute dtype
        tt, tv = min(tokens, FUSED_HEAD_TILE[0]), min(d["vocab"], FUSED_HEAD_TILE[1])
        logits = tt * tv * cdt + tokens * d["hidden"] * (4 + 2 * hidden_bytes)
        if up:
            logits += (tv + tt) * d["hidden"] * cdt
    else:
        logits = tokens * d["vocab"] * logit_bytes
    attn = attention_terms(d, micro_batch * (2 if method == "dpo" else 1), max_length, attention_mask,
                            attention_scores, cdt=cdt, layer_bytes=layer_bytes, score_bytes=hidden_bytes)
    kept_layers = 0 if gradient_checkpointing else d["layers"]
    # the mask lives through the step (checkpointed layers keep it for their recompute) and each layer not
    # checkpointed keeps what its attention saved; the computing layer's attention peak (its saved tensors when
    # recomputed, plus the transients) and the loss's logits are never live at once (the head's backward is done
    # before the first layer's), so the larger of the two counts
    attention = attn["mask"] + kept_layers * attn["saved"]
    phase = attn["transient"] + (attn["saved"] if gradient_checkpointing else 0)
    # what a layer's backward computes again, on top of everything kept (measured additive on the H200: 0.30 GiB at
    # 4 x 2048, 6.1 at 131,072 tokens): the fused MLP's silu(a) * b, and a recomputed normed hidden state
    again = (d["intermediate"] if fused_mlp else 0) + (d["hidden"] if recompute_norms else 0)
    activations = acts + attention + max(logits, phase) + tokens * again * layer_bytes
    if not gradient_checkpointing:
        activations += mlp_again

    allocated = weights + adapter + activations
    overhead = (CUDA_CONTEXT_BYTES if device_type == "cuda" else 0) + FRAGMENTATION * allocated
    total = int(allocated + overhead)
    breakdown = {
        "weights": int(weights),
        "adapter+optimizer": int(adapter),
        "activations": int(activations),
        "overhead": int(overhead),
    }
    est = MemoryEstimate(
        total_bytes=total,
        breakdown=breakdown,
        fits=None,
        device_bytes=device_memory_bytes,
        host_bytes=int(host),
        host_memory_bytes=host_memory_bytes,
        assumptions={
            "micro_batch": micro_batch, "max_length": max_length, "quantization": quantization, "r": r,
            "gradient_checkpointing": gradient_checkpointing, "dtype": dtype, "lora_params": n_lora,
            "base_params": counts["total"], "fused_lm_head": fused_lm_head, "kbit_upcast": kbit_upcast,
            "fused_kernels": fused_kernels, "shards": shards, "lora_dropout": lora_dropout,
            "offload_layers": offloaded, "tiled_mlp": tiled_mlp, "attention_mask": attn["kind"],
            "attention_scores": attention_scores, "fused_mlp": fused_mlp, "recompute_norms": recompute_norms,
            "recompute_mlp": recompute_mlp,
            # the backward transient of a layer recomputing its MLP (in the total without checkpointing)
            "recompute_mlp_bytes": int(mlp_again) if not gradient_checkpointing else 0,
            "layer_input_bytes": int(state),  # what a checkpointed layer keeps
            # what attention adds to the peak: the mask, the layers' saved attention and its phase over the logits
            "attention_bytes": int(attention + max(0, phase - logits)),
            # the one layer recomputed in backward (in the total when checkpointing): speed._checkpoint_layers
            "recompute_bytes": int(full_layer) if gradient_checkpointing else 0,
        },
    )
    est.fits = est.device_fits and est.host_fits  # None where the device is unknown
    return est


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length() if n > 0 else 0


_ESTIMATE_SIGNATURE = inspect.signature(_estimate)


def estimate(model_config: dict[str, Any], **kwargs: Any) -> MemoryEstimate:
    """Estimated peak bytes of one training step (arguments: ``_estimate``'s), with suggestions when it
    does not fit. The suggestions re-check ``_estimate`` a bounded number of times (O(log log) of the
    batch and length), never this function, so the work does not grow with the values."""
    est = _estimate(model_config, **kwargs)
    if est.fits is False:
        bound = _ESTIMATE_SIGNATURE.bind(model_config, **kwargs)
        bound.apply_defaults()
        args = {k: v for k, v in bound.arguments.items() if k != "model_config"}
        est.suggestions = _suggest.changes(
            lambda **change: bool(_estimate(model_config, **{**args, **change}).fits), args)
    return est


def kept_layers_peak(full: MemoryEstimate, none: MemoryEstimate, layers: int, keep: int, *,
                     allocated: bool = False, mlp: MemoryEstimate | None = None, mlp_layers: int = 0) -> int:
    """Peak bytes when the last ``keep`` decoder layers keep their activations, the ``mlp_layers`` before them keep
    them less their MLP's gate/up outputs (recompute.py; ``mlp``: the estimate of every layer doing that) and the
    first ones are checkpointed, from the all-checkpointed (``full``) and no-checkpointing (``none``) estimates.

    Each layer not checkpointed adds its activations less its checkpointed input. Backward runs from the last
    layer: the start of backward holds everything; a layer's transient in backward (the one layer recomputed
    under checkpointing, ``full``'s "recompute_bytes"; a recomputed MLP's gate/up outputs) comes after the layers
    behind it have freed theirs, so it counts only where those cannot cover it: the MLP's when no layer is kept,
    and the checkpointed layer's as the larger of that phase and the start. ``allocated``: without the CUDA
    context and fragmentation, i.e. what torch.cuda.max_memory_allocated measures.
    """
    slack = 1 if allocated else 1 + FRAGMENTATION

    def total(e: MemoryEstimate) -> float:
        return e.total_bytes - (e.breakdown["overhead"] if allocated else 0)

    f, z = total(full), total(none)
    keep = max(0, min(keep, layers))
    mlp_layers = max(0, min(mlp_layers, layers - keep)) if mlp is not None else 0
    if not keep and not mlp_layers:
        return int(f)
    r = full.assumptions.get("recompute_bytes", 0) * slack
    peak = f - r + keep * (z - f + r) / layers
    if mlp_layers:
        e = mlp.assumptions.get("recompute_mlp_bytes", 0) * slack
        peak += mlp_layers * (total(mlp) - e - f + r) / layers + (0 if keep else e)
    if keep + mlp_layers < layers:  # the first checkpointed layer's recompute, once the others have freed theirs
        peak = max(peak, f - (keep + mlp_layers) * full.assumptions.get("layer_input_bytes", 0) * slack)
    return int(peak)


def check_fits(estimate_: MemoryEstimate, *, what: str = "this training plan") -> None:
    """Raise ResourceError when the estimate does not fit the device."""
    if estimate_.fits is False:
        if estimate_.device_fits and not estimate_.host_fits:
            where = (f"more than {HOST_SHARE:.0%} of the host's {human_bytes(estimate_.host_memory_bytes or 0)} "
                     f"for the activations offloaded to it")
        else:
            where = f"more than {HEADROOM:.0%} of the device's {human_bytes(estimate_.device_bytes or 0)}"
        raise ResourceError(f"{what} needs {estimate_.summary()}, {where}", hint="; or ".join(estimate_.suggestions))
