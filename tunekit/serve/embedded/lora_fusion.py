"""Mixed-adapter decode: lora_triton's kernels fused into the launches around them (Llama-style decoder layers).

Why: with lora_triton, the LoRA side of an 8B decode step (16 rows, 16 adapters) is ~256 small launches, ~1.1 ms
on an H200 against ~0.3 ms of adapter reads: each launch costs its gap whatever it does. Half of them can ride
on launches the layer makes anyway:

* the RMSNorm before q/k/v (and the one before gate/up) computes the group's shrink in the same launch
  (``norm_shrink``): its programs read the normalised input anyway;
* the MLP's gate/up expand, SiLU(gate) * up and the down projection's shrink are one launch
  (``expand_swiglu``): the activation is produced where the shrink needs it.

Per layer that is 4 launches for LoRA instead of 8 (plus the norm and the SiLU the base step has anyway).
Only where it is exact: norms computed as Llama's (fp32 rstd, rounded, times the weight; transformers' or Liger's
"llama" mode), MLPs ``down(silu(gate(x)) * up(x))`` with all three wrapped, and the decode steps lora_triton serves.
Everything else calls the module's own forward. A norm's shrink is used only by a group given that very output
tensor (the identity check of lora_slots), so a layer wired otherwise still computes its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import lora_triton

# Norm classes computing weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype). Liger patches a model's norms in place
# (the class stays) and swaps transformers' class for LigerRMSNorm for models built later: its "llama" mode with
# offset 0 is the same computation.
_LLAMA_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "LigerRMSNorm"})
# The norm that feeds a sibling group, by the group's family in lora_slots._SHARED_INPUT (decoder layer siblings).
_NORM_BEFORE = {("q_proj", "k_proj", "v_proj"): "input_layernorm", ("gate_proj", "up_proj"): "post_attention_layernorm"}


def kernel_step(st: Any, x: torch.Tensor, group: Any) -> bool:
    """Whether ``group`` (a lora_slots._ShrinkGroup) given ``x`` runs lora_triton's kernels: a mixed decode step (one
    token per row), with the rows' state ``st`` (lora_slots._RowState)."""
    return (st.kernels and st.mode == "mixed" and x.dim() == 3 and x.shape[1] == 1 and group.kernels
            and x.shape[0] == st.rows.shape[0] and not torch.is_grad_enabled() and not (st.dora and group.biased))


def _llama_norm(norm: Any, width: int) -> bool:
    w = getattr(norm, "weight", None)
    return (type(norm).__name__ in _LLAMA_NORMS and isinstance(w, torch.Tensor) and w.shape == (width,)
            and getattr(norm, "offset", 0.0) == 0.0 and getattr(norm, "casting_mode", "llama") == "llama"
            and _eps(norm) is not None)


def _eps(norm: Any) -> float | None:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", None) if eps is None else eps


class _NormShrink:
    """A norm's forward: on a kernel decode step, the norm and its group's shrink in one launch."""

    def __init__(self, norm: nn.Module, forward: Any, state: Any) -> None:
        self.norm, self.forward, self.state = norm, forward, state
        self.group: Any = None
        self.eps = float(_eps(norm))

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        g, st = self.group, self.state
        if (args or kwargs or g is None or not lora_triton.TUNING["fuse"] or not kernel_step(st, hidden, g)
                or not hidden.is_contiguous()):
            return self.forward(hidden, *args, **kwargs)
        x2 = hidden.view(-1, hidden.shape[-1])
        xn = torch.empty_like(x2)
        h = g.partials(x2, st)
        lora_triton.norm_shrink(x2, self.norm.weight, self.eps, g.storage, g.a_offs, g.rank_of(), st.rows, xn, h)
        out = xn.view(hidden.shape)
        g.pre_x, g.pre_h = out, h
        return out


class _SwiGLU:
    """A Llama MLP's forward: on a kernel decode step, gate/up's expand, the activation and down's shrink fused."""

    def __init__(self, mlp: nn.Module, forward: Any, state: Any) -> None:
        self.mlp, self.forward, self.state = mlp, forward, state
        self.on = False  # set by fuse() where gate/up are one sibling group (re-checked at every new layout)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mlp, st = self.mlp, self.state
        gu, dn = mlp.gate_proj._group, mlp.down_proj._group
        if (args or kwargs or not self.on or not lora_triton.TUNING["fuse"] or not kernel_step(st, x, gu)
                or not dn.kernels or (st.dora and dn.biased)):
            return self.forward(x, *args, **kwargs)
        flat, _, h = gu.kernel_round(x, st)
        st.shared_shrinks += 1  # up's shrink rode on gate's, as in an unfused round
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        batch, inter = flat.numel() // (2 * gate.out_features), gate.out_features
        act = torch.empty(batch, inter, dtype=flat.dtype, device=flat.device)
        hd = torch.empty(lora_triton.swiglu_splits(inter), batch, dn.rank_of(), dtype=torch.float32,
                         device=flat.device)

        def off(t: torch.Tensor) -> int:  # where t starts in a slot's row of the storage
            return t.storage_offset() - gu.storage.storage_offset()

        offsets = {"bg": off(gate.BT), "bu": off(up.BT), "ad": off(down.A)}
        if st.dora:
            offsets.update(gg=off(gate.G), gu=off(up.G))
        lora_triton.expand_swiglu(h, gu.rank_of(), gu.storage, st.rows, flat, act, hd, gate=gate._gidx,
                                  offsets=offsets, gain=st.dora)
        base = down.base_layer
        y = torch.mm(act, base.weight.t()) if base.bias is None else torch.addmm(base.bias, act, base.weight.t())
        lora_triton.expand(hd, dn.rank_of(), dn.storage, *dn.expand_meta(batch, st.dora), st.rows, y, gain=st.dora)
        return y.view(*x.shape[:-1], y.shape[-1])


def _silu_mlp(mlp: nn.Module) -> bool:
    if isinstance(mlp.__dict__.get("forward"), _SwiGLU):
        return True
    act = getattr(mlp, "act_fn", None)
    liger = type(mlp).__name__.startswith("Liger") or getattr(mlp.forward, "__qualname__", "").startswith("Liger")
    return liger or type(act).__name__ in ("SiLU", "SiLUActivation")


def fuse(model: nn.Module, wrapped: dict[str, nn.Module], state: Any) -> dict[str, int]:
    """Install (or re-point, after a new layout) the fused forwards on ``model`` whose adapted linear layers are
    ``wrapped`` (name -> lora_slots.SlotLinear); counts of what was fused."""
    adapted = {id(w) for w in wrapped.values()}
    named = dict(model.named_modules())
    counts = {"norm_shrink": 0, "swiglu": 0}
    for module in named.values():  # what the new layout no longer has computes nothing fused
        hook = module.__dict__.get("forward")
        if isinstance(hook, _NormShrink):
            hook.group = None
        elif isinstance(hook, _SwiGLU):
            hook.on = False
    for name, w in wrapped.items():
        parent, _, child = name.rpartition(".")
        group = w._group
        fam = next((f for f in _NORM_BEFORE if child in f), None)
        if fam is not None and group.members[0] is w and len(group.members) > 1:
            norm = named.get(f"{parent.rpartition('.')[0]}.{_NORM_BEFORE[fam]}")
            if norm is not None and _llama_norm(norm, w.in_features):
                hook = norm.__dict__.get("forward")
                if not isinstance(hook, _NormShrink):
                    hook = _NormShrink(norm, norm.forward, state)
                    norm.forward = hook
                hook.group = group
                counts["norm_shrink"] += 1
        if child == "down_proj":
            mlp = named.get(parent)
            if (mlp is not None and all(id(getattr(mlp, p, None)) in adapted for p in ("gate_proj", "up_proj",
                                                                                       "down_proj"))
                    and mlp.gate_proj._group is mlp.up_proj._group and len(mlp.gate_proj._group.members) == 2
                    and _silu_mlp(mlp)):
                hook = mlp.__dict__.get("forward")
                if not isinstance(hook, _SwiGLU):
                    hook = _SwiGLU(mlp, mlp.forward, state)
                    mlp.forward = hook
                hook.on = True
                counts["swiglu"] += 1
    return counts
