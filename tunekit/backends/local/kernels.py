"""The speed plan applied to a PEFT model: Liger's kernels, the fused LoRA/DoRA forwards, per-layer checkpointing
(and, for long context, longctx.py's activation offload and tiled MLP).

speed.py decides (`SpeedPlan`), this module acts on the loaded model (`apply`, then `after_trainer`). QLoRA
layers (a bitsandbytes 4-bit base, LoRA or DoRA) run as one autograd function in nf4.py; this module holds the
16-bit path and the dispatch to it.

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
               base it is one GEMM epilogue plus one addcmul, kept in the activations' dtype.
  fused MLP    (Liger + fast_lora, 4-bit down_proj without dropout) down_proj(silu(a) * b) as one function that
               keeps the SwiGLU's inputs a and b and computes silu(a) * b again in backward, instead of also
               keeping it for the adapter's gradient (`fuse_swiglu_down`): a fifth less memory per layer, so the
               plan checkpoints fewer layers; the same values.

Liger's RoPE rotates q/k in place (forward) and its SwiGLU writes the gate/up gradients over the gate/up outputs
(backward), in Triton, unseen by autograd's version counters. The 4-bit DoRA function saves its output for the
magnitude's gradient, so with Liger on (`guard_dora_outputs`) the DoRA layers feeding RoPE return a copy and the
MLPs with DoRA gate/up get a SwiGLU whose backward writes into new tensors (a transient [tokens, 2 x
intermediate] per layer in backward, where Liger's is in place). The 16-bit DoRA forward needs neither: what
autograd saves there (the addmm output) is not the tensor it returns.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

from . import dora_triton as _dora_triton
from . import longctx as _longctx
from . import nf4
from . import recompute as _recompute
from .speed import SpeedPlan


@dataclass
class FastState:
    """What the fused forwards of one model keep between calls, beside PEFT's modules rather than on them.

    Every patched forward closes over the model's one FastState (the only thing set on a PEFT module is its
    replaced ``forward``, which also holds the original for the cases the fast path does not cover).
    """

    fuse_dora: bool = False  # DoRA layers without dropout take the fused LoRA forward too
    passes: int | None = None  # forward passes of the decoder so far (`track_forward_passes`); None: not counted
    nf4_dora: list = field(default_factory=list)  # (LoRA layer, adapter): DoRA layers nf4.py computes per pass
    cache: dict = field(default_factory=dict)  # (module, what) -> (key, value): per-pass and frozen-weight values
    copy_out: set = field(default_factory=set)  # LoRA layers whose DoRA output a later kernel rewrites in place
    swiglu_ops: Any = None  # the SwiGLU kernels of `fuse_swiglu_down` (forward(a, b), backward(a, b, dc))


def apply(model: Any, sp: SpeedPlan, *, sharded: bool = False) -> dict[str, Any]:
    """Apply the plan to a PEFT model (after get_peft_model, before the trainer). Returns what was done.
    ``sharded``: the model trains under FSDP2 (recompute_norms and recompute_mlp are left out there)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done: dict[str, Any] = {}
    if sp.on("liger"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # TRL's chunked LM head already avoids the logits, and TRL refuses Liger's fused cross-entropy
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        done["liger"] = True
    state = FastState(fuse_dora=sp.on("fast_dora"))
    if sp.on("fast_lora"):
        done["fast_lora_modules"] = patch_lora(model, state)
    if sp.on("fast_dora"):
        done["fast_dora_modules"] = patch_dora(model, state)
        track_forward_passes(model, state)
        four_bit = [m for m, _ in state.nf4_dora if nf4.eligible(m.get_base_layer())]
        if four_bit:  # 4-bit DoRA: the magnitude's gradient as a Triton kernel where it runs
            dev = four_bit[0].get_base_layer().weight.device
            done["dora_kernels"] = "triton" if _dora_triton.available(dev) else "torch"
        if sp.on("liger"):
            from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

            done.update(guard_dora_outputs(model, state, _liger_silu_mul_keep(), LigerSwiGLUMLP.forward))
    if sp.on("liger") and sp.on("fast_lora"):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        done["fused_swiglu_down"] = fuse_swiglu_down(model, state, _LigerSwiGLU, LigerSwiGLUMLP.forward,
                                                     LigerSiLUMulFunction)
    done["checkpointed_layers"] = set_checkpointing(base, sp.checkpointed_layers)
    done.update(_longctx.apply(base, sp))  # activation offload, tiled MLP (long context)
    if sp.on("recompute_norms") and not sharded:  # (FSDP2 reshards the norms' weights after forward)
        done["recompute_norms_layers"] = _recompute.recompute_norms(base)
        if sp.on("recompute_mlp"):  # the layers after the checkpointed ones
            first, n = sp.checkpointed_layers, sp.mlp_recompute_layers
            sent = _offload_mlp_layers(base, sp) if sp.on("offload_mlp") else []
            done["recompute_mlp_layers"] = _recompute.recompute_mlp(
                base, range(first, first + n), offload=sent, host_budget=_host_budget(sp) if sent else 0)
            if sent:
                done["offload_mlp_layers"] = len(sent)
    return done


def _offload_mlp_layers(base: Any, sp: SpeedPlan) -> list[int]:
    """The MLP-recomputing layers that send their gate/up outputs to host memory instead (offload_mlp): as many
    as the host link serves during a forward pass (recompute.offload_share, measured on this GPU), spread evenly
    over them so that each copy has the layers after it to finish in."""
    import torch

    from .memory import _dims, _linear_shapes

    device = next((p.device for p in base.parameters() if p.is_cuda), None)
    if device is None or not torch.cuda.is_available():
        return []
    d = _dims(base.config.to_dict())
    params = sum(a * b for a, b in _linear_shapes(d))  # one layer's linear weights
    n, first = sp.mlp_recompute_layers, sp.checkpointed_layers
    k = min(n, _recompute.offload_share(sp.num_layers, d["hidden"], d["intermediate"], params, device))
    return [first + (j * n) // k for j in range(k)] if k else []


def _host_budget(sp: SpeedPlan) -> int:
    """Pinned bytes offload_mlp may hold: this rank's part of the host-memory share the long-context offload may
    take (the ranks of a node share its memory), less what that offload takes."""
    from . import ranks
    from .memory import HOST_SHARE
    from .resolve import host_memory_bytes

    host = host_memory_bytes() or 0
    return max(0, int(HOST_SHARE * host) // ranks.local_world_size() - sp.host_bytes)


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

def _patch(module: Any, fast: Any, state: FastState) -> bool:
    """Replace ``module``'s forward by ``fast(module, state, original_forward, ...)``, once."""
    if getattr(vars(module).get("forward"), "func", None) in (_fast_lora_forward, _fast_dora_forward):
        return False
    module.forward = functools.partial(fast, module, state, module.forward)
    return True


def patch_lora(model: Any, state: FastState | None = None) -> int:
    """Give every PEFT LoRA Linear / Linear4bit the fused forward; returns how many were patched.

    ``state.fuse_dora``: DoRA layers (without dropout) take the fused path too, as scale * (base + s * B A x).
    """
    from peft.tuners.lora import LoraLayer

    state = state or FastState()
    return sum(_patch(m, _fast_lora_forward, state) for m in model.modules()
               if isinstance(m, LoraLayer) and type(m).__name__ in ("Linear", "Linear4bit"))


def _fast_lora_forward(self: Any, state: FastState, original: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    call = None if args or kwargs else _lora_call(self, state)
    if call is None:
        return original(x, *args, **kwargs)
    name, dora = call
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if dora is not None or type(self).__name__ == "Linear4bit":
        out = nf4.lora_forward(self, x, name, dora, state)
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
            return original(x, *args, **kwargs)
        # mixed dtypes without autocast: PEFT's own promotion rules apply
        return (result + lora_B(h) * s).to(result.dtype)
    # base + s * B(A(x)) in the GEMM's epilogue: no separate scale, add or (QLoRA) defensive clone
    y = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), w.t(), alpha=s)
    if dora is not None:
        # PEFT's base + (m/n - 1) * base + (m/n) * s * lora is (m/n) * (base + s * lora) = y + y * (m/n - 1);
        # (m/n - 1) is small, so it is formed in fp32 before going to the activations' dtype
        norm = dora_weight_norm(dora, self.get_base_layer(), lora_A.weight, w, s, state)
        y = torch.addcmul(y, y, (dora.weight / norm - 1).to(y.dtype).view(1, -1))
    return y.view(result.shape).to(result.dtype)


def _lora_call(self: Any, state: FastState) -> tuple[str, Any] | None:
    """(adapter, its fusable DoRA layer or None) when the fused forward applies to a call of this LoRA layer."""
    if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return None
    name = self.active_adapters[0]
    dora = None
    if name in getattr(self, "lora_variant", {}) or self.use_dora.get(name):
        dora = _fusable_dora(self, name) if state.fuse_dora else None
        if dora is None:
            return None
    if name not in self.lora_A or self.lora_B[name].bias is not None or self.lora_A[name].bias is not None:
        return None
    return name, dora


def _fusable_dora(layer: Any, name: str) -> Any:
    """The DoRA magnitude layer when the fused path computes exactly PEFT's DoRA forward, else None."""
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    mags = getattr(layer, "lora_magnitude_vector", None)
    if mags is None or name not in mags:
        return None
    mag = mags[name]
    if type(mag) is not DoraLinearLayer or mag.fan_in_fan_out or getattr(layer.get_base_layer(), "bias", None) is not None:
        return None
    if layer.training and not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None  # PEFT's DoRA applies dropout to its base term too
    return mag


# ------------------------------------------------------------------------------------------------ DoRA

# the projections whose outputs Liger's RoPE rotates in place (Llama-family names, as Liger's own patches use)
ROPE_INPUTS = ("q_proj", "k_proj")


def guard_dora_outputs(model: Any, state: FastState, silu_mul: Any, swiglu_forward: Any) -> dict[str, int]:
    """Keep the 4-bit DoRA outputs that the magnitude's gradient reads away from Liger's in-place kernels: the
    DoRA layers feeding RoPE return a copy (``state.copy_out``), and every MLP whose bound forward is
    ``swiglu_forward`` (Liger's SwiGLU MLP) and whose gate/up are 4-bit DoRA layers runs ``silu_mul`` instead
    (an autograd Function (a, b) -> silu(a) * b that leaves a and b alone). Call after Liger and
    `track_forward_passes`; returns the counts."""
    dora = {m for m, _ in state.nf4_dora if nf4.eligible(m.get_base_layer())}
    state.copy_out = {m for name, m in model.named_modules() if m in dora and name.rsplit(".", 1)[-1] in ROPE_INPUTS}
    mlps = 0
    for m in model.modules():
        bound = getattr(vars(m).get("forward"), "__func__", None)
        if bound is swiglu_forward and (getattr(m, "gate_proj", None) in dora or getattr(m, "up_proj", None) in dora):
            m.forward = functools.partial(_swiglu_forward, m, state, silu_mul, True)
            mlps += 1
    return {"dora_copied_outputs": len(state.copy_out), "dora_swiglu_keeping_inputs": mlps}


# ------------------------------------------------------------------------------------------------ MLP

def fuse_swiglu_down(model: Any, state: FastState, ops: Any, swiglu_forward: Any, silu_mul: Any) -> int:
    """The down projection of every SwiGLU MLP with a 4-bit LoRA/DoRA down_proj takes the SwiGLU's inputs:
    down_proj(silu(a) * b) runs as one function (nf4.swiglu_function) that keeps a and b, which the SwiGLU's
    backward needs anyway, and computes c = silu(a) * b again in backward, where the two functions in a row also
    keep c ([tokens, intermediate] per layer, about a fifth of what a layer keeps) for the adapter's dL/dA.

    ``ops``: the SwiGLU kernels (forward(a, b) -> c; backward(a, b, dc) -> (da, db), allowed to write over a and
    b); ``swiglu_forward``: the MLP forward to replace (Liger's, bound on the instance); ``silu_mul``: the
    SwiGLU autograd function the MLP falls back to on a call the fused path does not take (dropout, merged or
    disabled adapters). MLPs guard_dora_outputs already replaced keep that guard. Returns how many MLPs take it."""
    state.swiglu_ops = ops
    n = 0
    for m in model.modules():
        down = getattr(m, "down_proj", None)
        if down is None or not hasattr(down, "get_base_layer") or not nf4.eligible(down.get_base_layer()):
            continue
        current = vars(m).get("forward")
        if getattr(current, "__func__", None) is swiglu_forward:
            m.forward = functools.partial(_swiglu_forward, m, state, silu_mul, False)
        elif getattr(current, "func", None) is not _swiglu_forward:
            continue
        n += 1
    return n


def _swiglu_forward(mlp: Any, state: FastState, silu_mul: Any, keep: bool, x: Any) -> Any:
    """Liger's SwiGLU MLP forward, with the down projection fused with the SwiGLU where `fuse_swiglu_down` set
    the kernels (``keep``: the SwiGLU leaves its inputs alone, for 4-bit DoRA gate/up)."""
    a, b = mlp.gate_proj(x), mlp.up_proj(x)
    down = mlp.down_proj
    if state.swiglu_ops is not None and _patched(down):
        call = _lora_call(down, state)
        y = None if call is None else nf4.swiglu_down(down, a, b, *call, state, state.swiglu_ops, keep)
        if y is not None:
            return y
    return down(silu_mul.apply(a, b))


def _patched(layer: Any) -> bool:
    return getattr(vars(layer).get("forward"), "func", None) is _fast_lora_forward


class _LigerSwiGLU:
    """Liger's SwiGLU kernels, as `fuse_swiglu_down` takes them (its backward writes da, db over a, b)."""

    @staticmethod
    def forward(a: Any, b: Any) -> Any:
        from liger_kernel.ops.swiglu import swiglu_forward

        return swiglu_forward(a.contiguous(), b.contiguous())[2]

    @staticmethod
    def backward(a: Any, b: Any, dc: Any) -> Any:
        from liger_kernel.ops.swiglu import swiglu_backward

        return swiglu_backward(a, b, dc)


@functools.cache
def _liger_silu_mul_keep() -> Any:
    """Liger's SwiGLU function with a backward that writes the gradients into new tensors, not over a and b."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction, swiglu_backward

    class SiLUMulKeepInputs(LigerSiLUMulFunction):
        @staticmethod
        def backward(ctx: Any, dc: Any) -> Any:
            if ctx.dtensor_metadata is not None:  # sharded activations: Liger's own (nf4.py refuses an overwrite)
                return LigerSiLUMulFunction.backward(ctx, dc)
            a, b = ctx.saved_tensors
            dc = dc.contiguous() if ctx.down_multiplier == 1.0 else dc * ctx.down_multiplier
            da, db = swiglu_backward(a.clone(), b.clone(), dc, ctx.gate_multiplier)
            return da, db, None, None

    return SiLUMulKeepInputs

def track_forward_passes(model: Any, state: FastState) -> FastState:
    """Count forward passes of the decoder in ``state.passes`` (a pre-hook on the backbone, which the checkpoint
    recompute does not re-enter): every DoRA layer's weight norm is then recomputed once per pass.

    Parameter version counters cannot key that cache: bitsandbytes' optimizers update weights in their own
    kernels, which do not bump them.
    """
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None) or base
    state.passes = 0

    def bump(module: Any, args: Any) -> None:
        state.passes += 1

    backbone.register_forward_pre_hook(bump)
    # the LoRA layers whose DoRA values nf4.py computes together, once per pass
    state.nf4_dora = [(m, n) for m in model.modules() if isinstance(getattr(m, "lora_magnitude_vector", None),
                                                                     torch.nn.ModuleDict)
                      for n, mag in m.lora_magnitude_vector.items() if type(mag) is DoraLinearLayer]
    return state


def patch_dora(model: Any, state: FastState | None = None) -> int:
    """Give every DoRA linear layer the cached-norm forward; returns how many were patched."""
    from peft.tuners.lora.dora import DoraLinearLayer

    state = state or FastState()
    return sum(_patch(m, _fast_dora_forward, state) for m in model.modules()
               if type(m) is DoraLinearLayer and not m.fan_in_fan_out)


def dora_weight_norm(layer: Any, base_layer: Any, A: Any, B: Any, scaling: float,
                     state: FastState | None = None) -> Any:
    """||W_i + s (B A)_i|| per output row, fp32, without materialising W + s B A.

    ||W_i||^2 + 2 s <W_i A^T, B_i> + s^2 B_i (A A^T) B_i^T: ||W||^2 is cached (W is frozen), the rest needs
    W A^T (out x r). With a pass counter (``state.passes``, `track_forward_passes`) the value is computed once
    per forward pass and reused by that pass's checkpoint recompute; without one it is computed on every call.
    """
    import torch
    from peft.utils.integrations import dequantize_module_weight

    cache = state.cache if state is not None else {}
    passes = state.passes if state is not None else None
    key = None if passes is None else (passes, A.data_ptr(), B.data_ptr(), A.dtype, B.dtype, float(scaling))
    cached = cache.get((layer, "norm"))
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        W = dequantize_module_weight(base_layer)
        wkey = (base_layer.weight.data_ptr(), W.shape)
        wsq = cache.get((layer, "wsq"))
        if wsq is None or wsq[0] != wkey:
            wsq = cache[(layer, "wsq")] = (wkey, W.float().pow(2).sum(1))
        WA = W @ A.to(W.dtype).t()  # out x r, one pass over W
        norm = nf4.dora_norm(wsq[1], WA, A, B, scaling)
    cache[(layer, "norm")] = (key, norm)
    return norm


def _fast_dora_forward(self: Any, state: FastState, original: Any, x: Any, *, lora_A: Any, lora_B: Any,
                       scaling: float, base_layer: Any, base_result: Any = None, adapter_name: str = "default") -> Any:
    import torch.nn.functional as F
    from peft.utils.integrations import dequantize_module_weight

    norm = dora_weight_norm(self, base_layer, lora_A.weight, lora_B.weight, scaling, state)
    scale = self.weight / norm  # magnitude (trainable) / detached norm, fp32
    lora_result = lora_B(lora_A(x))
    if base_result is None:  # dropout active: the base output of the un-dropped input is not available
        base_result = F.linear(x, dequantize_module_weight(base_layer).to(x.dtype))
    elif base_layer.bias is not None:
        base_result = base_result - base_layer.bias
    # (scale - 1) is formed in fp32 (it is small), then both factors go to the activations' dtype
    dt = base_result.dtype
    return (scale - 1).to(dt).view(1, -1) * base_result + (scale * scaling).to(dt).view(1, -1) * lora_result.to(dt)


@contextlib.contextmanager
def sdpa_for_lengths(on_gpu: bool, lengths: list[int]) -> Any:
    """cuDNN's SDPA off while a run whose sequence length changes between steps trains.

    Why: it builds and caches a plan per shape, 0.13-1.8 s per new length forward + backward on an H200
    (benchmarks/attention_shapes.py), against ~1.6 ms for the kernel itself; padded batches of mixed-length rows get
    a new length almost every step (the longest row of each), and so do packed ones (how full each pack is). Without
    it SDPA takes flash (no mask) or the memory-efficient kernel (masked rows, which memory.py's estimate assumes),
    neither of which plans per shape. Rows of one length (``lengths`` all equal, already cut at max_length) keep it.
    ``lengths`` empty (DPO: no per-row lengths are kept): the pairs vary, so it is off. Yields whether it is off.
    """
    off = on_gpu and len(set(lengths)) != 1
    if not off:
        yield False
        return
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
