"""Pre-allocated LoRA slots with per-row adapters: the embedded server's hot-swap and mixed-batch core.

Why not PEFT at serve time: PEFT's ``load_adapter`` reads and builds modules from disk (~500 ms for
r=16 on an 8B base), and its mixed-batch forward (``adapter_names=``) loops over the distinct adapters
of a batch in every layer, so kernel launches grow with the number of adapters in flight. Here:

* Every targeted ``nn.Linear`` is wrapped once by :class:`SlotLinear`. All slots live in ONE device
  tensor ``storage[num_slots + 1, total]``; row 0 is all zeros and stands for the base model.
  Each wrapped module sees views ``A[slot, r_max, in]`` and ``BT[slot, r_max, out]`` into it.
* An adapter is *packed* once on the host into that flat layout: ranks below ``r_max`` are
  zero-padded (B·A is unchanged) and the LoRA scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) is
  folded into B. A hot swap is then a single ``storage[slot].copy_(packed)``.
* A mixed batch gathers each row's A/B by slot index once per batch composition; each decode step
  then costs two kernels per module (``bmm`` shrink + fused ``baddbmm`` expand), whatever the number
  of distinct adapters. Sibling modules fed the same input (q/k/v, gate/up) share one shrink ``bmm``
  over their concatenated A, so a group of k costs k + 1 kernels. Batches using one slot take a
  ``matmul`` + ``addmm`` path; base-only batches skip LoRA.
* On CUDA with Triton a mixed *decode* step (one token per row) skips the gathers: lora_triton's kernels read
  each row's A/B from the storage by slot index, one shrink + one expand per sibling group (~3x faster than the
  batched ``bmm`` on an H200); lora_fusion folds half of those launches into the layer's RMSNorms and SwiGLU.
  Prefill and CPUs keep the path above.

Adapter tensors are read with safetensors and scaled exactly as PEFT does (``rank_pattern`` /
``alpha_pattern`` resolved with the regex of PEFT's ``get_pattern_key``); tests compare against PEFT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._exceptions import ConfigError
from ...adapters.info import AdapterInfo
from . import lora_triton
from .lora_fusion import fuse, kernel_step

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:(?P<ab>[AB])(?:\.[^.]+)?\.weight"
                  r"|(?P<m>magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$")


@dataclass
class AdapterWeights:
    """One adapter on the host: per module (A [r, in], B·scale transposed [r, out]) until it is packed.

    For DoRA, ``gains`` holds per module ``g - 1`` with ``g = magnitude / ||W + B·scale·A||`` (per output
    row, fp32): the DoRA output is ``bias + g * (x W^T + x A^T (B·scale)^T)``, i.e. LoRA then a per-channel
    gain. Kept as ``g - 1`` so zero means "no DoRA" and the small deviation keeps its precision in 16 bits.
    """

    name: str
    path: Path
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    gains: dict[str, torch.Tensor] = field(default_factory=dict)


def read_adapter_weights(name: str, info: AdapterInfo, model: nn.Module) -> AdapterWeights:
    """Read an adapter's tensors, check them against ``model`` and fold in PEFT's scaling."""
    path = info.path
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st), device="cpu")
    else:
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if not m:
            raise ConfigError(
                f"adapter {name!r} ({path}) holds tensor {key!r}, which is not a plain LoRA weight",
                field="adapter", hint=f"merge it (`tunekit merge {path} OUT_DIR`) and serve the merged model")
        parts.setdefault(m["module"], {})[m["ab"] or "M"] = tensor
    named = dict(model.named_modules())
    raw = info.raw
    alpha_pattern = raw.get("alpha_pattern") or {}
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gains: dict[str, torch.Tensor] = {}
    rank = 0
    for module, ab in sorted(parts.items()):
        target = named.get(module)
        if isinstance(target, SlotLinear):
            target = target.base_layer
        if not isinstance(target, nn.Linear):
            what = "no such module" if target is None else f"a {type(target).__name__}, not nn.Linear"
            raise ConfigError(
                f"adapter {name!r} ({path}) targets {module!r}: {what} in the served base model",
                field="adapter.target_modules",
                hint="serve the adapter on the base it was trained on (adapter_config.json base_model_name_or_path); "
                     "only LoRA on linear layers is served by the embedded engine")
        if set(ab) != ({"A", "B", "M"} if info.use_dora else {"A", "B"}):
            what = "lora_A, lora_B or lora_magnitude_vector" if info.use_dora else "lora_A or lora_B"
            raise ConfigError(f"adapter {name!r} ({path}): {module} lacks {what} (or has a magnitude without "
                              "use_dora)", field="adapter", hint="the adapter file is incomplete; re-save it")
        a, b = ab["A"], ab["B"]
        for which, t in (("lora_A", a), ("lora_B", b), ("lora_magnitude_vector", ab.get("M", a))):
            if not torch.isfinite(t).all():  # would turn every row decoded with it into NaN logits
                raise ConfigError(
                    f"adapter {name!r} ({path}): {module}.{which} holds NaN or infinite values", field="adapter",
                    hint="the training run diverged; serve an earlier checkpoint, or retrain with a lower "
                         "learning rate")
        r = a.shape[0]
        if a.shape != (r, target.in_features) or b.shape != (target.out_features, r):
            raise ConfigError(
                f"adapter {name!r} ({path}): {module} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, which do not "
                f"fit the base layer ({target.in_features} -> {target.out_features})", field="adapter",
                hint="the adapter was trained on another base model; serve it with that base")
        alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, module), info.lora_alpha))
        scale = alpha / (math.sqrt(r) if info.use_rslora else r)
        # Scale in fp32, round once when packing; B·scale is kept as a transposed view (pack copies it).
        modules[module] = (a, (b.float() * scale).t())
        if "M" in ab:
            gains[module] = _dora_gain(target.weight, a, b.float() * scale, ab["M"])
        rank = max(rank, r)
    if not modules:
        raise ConfigError(f"adapter {name!r} ({path}) has no LoRA weights", field="adapter",
                          hint="re-save the adapter")
    return AdapterWeights(name=name, path=path, rank=rank, modules=modules, gains=gains)


def _dora_gain(weight: torch.Tensor, a: torch.Tensor, b_scaled: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output-row ``magnitude / ||W + scale·B·A|| - 1`` (PEFT's weight norm), in fp32, on the host."""
    w = weight.detach().float()
    norm = torch.linalg.norm(w + (b_scaled.to(w.device) @ a.float().to(w.device)), dim=1)
    gain = magnitude.float().to(w.device) / norm - 1
    if not torch.isfinite(gain).all():  # a zero row norm: the direction is undefined
        raise ConfigError("DoRA weight norm is zero for some output row", field="adapter",
                          hint="the adapter does not fit this base model")
    return gain.cpu()


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """PEFT's ``peft.utils.other.get_pattern_key`` (same regex), without importing peft (seconds) at serve time."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass(frozen=True)
class SlotLayout:
    """Where each module's A and B·scale live in one slot's flat buffer."""

    rank: int
    modules: tuple[tuple[str, int, int], ...]  # (name, in_features, out_features), sorted
    dora: bool = False  # each module also has an ``out``-long DoRA gain (g - 1), after every A and B

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        out, off = {}, 0
        for name, fin, fout in self.modules:
            out[name] = (off, off + self.rank * fin)
            off += self.rank * (fin + fout)
        return out

    @property
    def gain_offsets(self) -> dict[str, int]:
        off, out = sum(self.rank * (fin + fout) for _, fin, fout in self.modules), {}
        for name, _, fout in self.modules:
            out[name] = off
            off += fout
        return out if self.dora else {}

    @property
    def numel(self) -> int:
        return sum(self.rank * (fin + fout) + (fout if self.dora else 0) for _, fin, fout in self.modules)

    def covers(self, weights: AdapterWeights) -> bool:
        names = {m for m, _, _ in self.modules}
        return weights.rank <= self.rank and set(weights.modules) <= names and (self.dora or not weights.gains)

    def grown(self, weights: AdapterWeights, *, rank_cap: int | None = None) -> "SlotLayout":
        """The smallest layout covering this one and ``weights``."""
        mods = {m: (fi, fo) for m, fi, fo in self.modules}
        for m, (a, bt) in weights.modules.items():
            mods[m] = (a.shape[1], bt.shape[1])
        rank = max(self.rank, weights.rank)
        if rank_cap is not None:
            rank = max(rank, rank_cap)
        return SlotLayout(rank=rank, modules=tuple(sorted((m, fi, fo) for m, (fi, fo) in mods.items())),
                          dora=self.dora or bool(weights.gains))


EMPTY_LAYOUT = SlotLayout(rank=0, modules=())


def pack(weights: AdapterWeights, layout: SlotLayout, *, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """The adapter as one flat host tensor in ``layout`` (zero-padded ranks, zeros for untargeted modules)."""
    flat = torch.zeros(layout.numel, dtype=dtype)
    offsets = layout.offsets
    for name, fin, fout in layout.modules:
        if name not in weights.modules:
            continue
        a, bt = weights.modules[name]
        r = a.shape[0]
        a_off, b_off = offsets[name]
        flat[a_off:a_off + layout.rank * fin].view(layout.rank, fin)[:r].copy_(a)
        flat[b_off:b_off + layout.rank * fout].view(layout.rank, fout)[:r].copy_(bt)
    for name, off in layout.gain_offsets.items():
        if name in weights.gains:
            flat[off:off + weights.gains[name].numel()].copy_(weights.gains[name])
    return flat.pin_memory() if pin else flat


class _RowState:
    """Which slot each batch row uses; shared by every SlotLinear of one model."""

    def __init__(self) -> None:
        self.mode = "base"  # "base" | "single" | "mixed"
        self.slot = 0
        self.rows: torch.Tensor | None = None
        self.dora = False  # some row of the batch uses a DoRA adapter: apply the gains
        self.version = 0  # bumped whenever the rows change: invalidates the per-group gathers
        self.indexed = False  # rows routed for CUDA graphs: gathers go to fixed buffers, outside the captured step
        self.shared_shrinks = 0  # mixed-mode shrinks served from a sibling's bmm (no bmm of their own)
        self.kernels = False  # decode rows go through lora_triton's kernels (CUDA + Triton), not gathers + bmm
        self.fixed_rows: dict[int, torch.Tensor] = {}  # batch size -> slot index buffer read by captured steps


# Siblings that read the same input tensor in common HF architectures (Llama, Mistral, Qwen, Gemma, ...:
# q/k/v get ``hidden_states``, gate/up get the MLP input; BERT-style attention; Mixtral-style w1/w3).
# Why names and not just "same parent + same in_features": in Llama o_proj has in_features == hidden
# size too, but it reads the attention output, so it would never share: its columns in the group's bmm
# would be wasted work and the group could never tell that its round was over (to drop its input).
# Names only decide what is concatenated; correctness rests on the identity check in _ShrinkGroup.
_SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


class _ShrinkGroup:
    """Wrapped modules of one parent that read the same input: their mixed-batch shrinks are one ``bmm``.

    Once per batch composition the members' gathered A are concatenated into ``At [batch, in, r*k]``.
    The first member called with a new ``x`` computes ``bmm(x, At)`` and keeps (x, its r-column
    splits); a member called with that same tensor object takes its split. A member called with any
    other tensor computes its own shrink from its slice of ``At``, so results never depend on call order.
    The input is dropped once every member has used it: nothing outlives the round (the step).
    """

    __slots__ = ("members", "version", "rank", "At", "parts", "BT", "G", "x", "hs", "used", "full", "fixed",
                 "storage", "a_offs", "metas", "kx", "kouts", "kused", "kernels", "biased", "pre_x", "pre_h")

    def __init__(self, members: list["SlotLinear"]) -> None:
        self.members = members
        self.full = (1 << len(members)) - 1
        self.fixed: dict[tuple, tuple] = {}  # (batch, dora) -> persistent buffers read by captured steps
        # lora_triton's decode path: the slot storage, members' A offsets, expand tables per (batch, DoRA), the round
        self.storage: torch.Tensor | None = None
        self.a_offs: torch.Tensor | None = None
        self.metas: dict[tuple, tuple] = {}
        self.kx = self.kouts = None
        self.kused = 0
        self.pre_x = self.pre_h = None  # the shrink of input pre_x, computed with the norm before it (lora_fusion)
        # plain nn.Linear members only (the kernels run their base GEMMs); DoRA with a bias takes the bmm path
        self.kernels = all(type(m.base_layer) is nn.Linear for m in members)
        self.biased = any(m.base_layer.bias is not None for m in members)
        self.clear()

    def locate(self, storage: torch.Tensor) -> None:
        """Where each member's A sits in a slot's row of ``storage``, for lora_triton's shrink."""
        self.storage = storage
        self.a_offs = torch.tensor([m.A.storage_offset() - storage.storage_offset() for m in self.members],
                                   dtype=torch.int64, device=storage.device)
        self.metas = {}

    def kernel_outputs(self, i: int, x: torch.Tensor, st: _RowState) -> torch.Tensor:
        """Member ``i``'s output for a decode step (``x`` [batch, 1, in]) by lora_triton's kernels. The first member
        to see ``x`` computes the round for all: each member's base GEMM into one flat buffer, one shrink, one
        expand (with DoRA's gains); the others take their part (HF calls q, k, v with the same tensor)."""
        bit = 1 << i
        if x is self.kx and not self.kused & bit:
            out = self.kouts[i]
            st.shared_shrinks += 1
            self.kused |= bit
            if self.kused == self.full:
                self.kx = self.kouts = None
            return out
        flat, ys, h = self.kernel_round(x, st)
        lora_triton.expand(h, self.rank_of(), self.storage, *self.expand_meta(x.shape[0] * x.shape[1], st.dora),
                           st.rows, flat, gain=st.dora)
        if self.full != 1:
            self.kx, self.kouts, self.kused = x, ys, bit
        return ys[i]

    def rank_of(self) -> int:
        return self.members[0].A.shape[1]  # one layout: every member has the same (padded) rank

    def kernel_round(self, x: torch.Tensor, st: _RowState) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """A decode round before the expand: each member's base GEMM into one flat buffer (``flat``, views ``ys``)
        and the group's shrink partials ``h`` (taken from the norm before the group when it computed them)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        batch = x2.shape[0]
        outs = [m.base_layer.out_features for m in self.members]
        flat = torch.empty(batch * sum(outs), dtype=x2.dtype, device=x2.device)
        ys, off = [], 0
        for m, n in zip(self.members, outs):
            y = flat[off:off + batch * n].view(batch, n)
            w, bias = m.base_layer.weight, m.base_layer.bias
            torch.mm(x2, w.t(), out=y) if bias is None else torch.addmm(bias, x2, w.t(), out=y)
            ys.append(y.view(*x.shape[:-1], n))
            off += batch * n
        if x is self.pre_x:  # lora_fusion's norm wrote this input and its shrink in one launch
            h, self.pre_x, self.pre_h = self.pre_h, None, None
        else:
            h = self.partials(x2, st)
            lora_triton.shrink(x2, self.storage, self.a_offs, self.rank_of(), st.rows, h)
        return flat, ys, h

    def partials(self, x2: torch.Tensor, st: _RowState) -> torch.Tensor:
        """An empty buffer for the shrink's fp32 partial sums of ``x2`` [batch, in]."""
        return torch.empty(lora_triton.splits_for(x2.shape[1]), x2.shape[0], self.rank_of() * len(self.members),
                           dtype=torch.float32, device=x2.device)

    def expand_meta(self, batch: int, dora: bool) -> tuple[torch.Tensor, int]:
        """lora_triton.expand's member table for ``batch`` rows (kept per batch size and DoRA)."""
        meta = self.metas.get((batch, dora))
        if meta is None:
            outs = [m.base_layer.out_features for m in self.members]
            y_offs = [batch * sum(outs[:j]) for j in range(len(outs))]
            g_offs = [m.G.storage_offset() for m in self.members] if dora else None
            meta = self.metas[(batch, dora)] = lora_triton.expand_meta(
                outs, y_offs, [m.BT.storage_offset() for m in self.members], g_offs, self.storage.device)
        return meta

    def clear(self) -> None:
        self.version = self.rank = -1
        self.At = self.parts = self.BT = self.G = self.x = self.hs = None
        self.used = 0
        self.kx = self.kouts = self.pre_x = self.pre_h = None
        self.kused = 0

    def gather(self, st: _RowState, *, fixed: bool = False) -> None:
        """The rows' A (concatenated, transposed), B and DoRA gains of every member.

        ``fixed`` (CUDA graphs): copy them into buffers kept per batch size, so a captured step reads whatever
        was gathered last, and the gather itself runs once per batch composition, outside the graph."""
        rows = st.rows
        self.rank = self.members[0].A.shape[1]  # one layout: every member has the same (padded) rank
        a = [m.A.index_select(0, rows) for m in self.members]
        at = torch.cat(a, dim=1) if len(a) > 1 else a[0]  # [batch, r*k, in]
        bt = [m.BT.index_select(0, rows) for m in self.members]
        g = [m.G.index_select(0, rows) if st.dora else None for m in self.members]  # [batch, 1, out]
        if fixed:
            key = (len(rows), st.dora)  # apply_layout empties them: a new storage is a new capture
            bufs = self.fixed.get(key)
            if bufs is None:
                bufs = self.fixed[key] = (at.clone(), [b.clone() for b in bt],
                                          [None if x is None else x.clone() for x in g])
            else:
                for dst, src in zip((bufs[0], *bufs[1], *bufs[2]), (at, *bt, *g)):
                    if dst is not None:
                        dst.copy_(src)
            at, bt, g = bufs
        self.At = at.transpose(1, 2)  # [batch, in, r*k]
        self.parts = self.At.split(self.rank, dim=2)  # each member's [batch, in, r] view
        self.BT, self.G = bt, g
        self.x = self.hs = None
        self.used = 0
        self.version = st.version

    def shrink(self, i: int, x: torch.Tensor, xb: torch.Tensor, st: _RowState) -> torch.Tensor:
        """Member ``i``'s ``xb @ A_rows^T`` (``x`` is the tensor the module got, ``xb`` it as [batch, t, in])."""
        if self.full == 1:
            return torch.bmm(xb, self.At)
        bit = 1 << i
        if x is self.x:
            h = self.hs[i]
            st.shared_shrinks += 1
            self.used |= bit
            if self.used == self.full:  # every member served: let the activation go
                self.x = self.hs = None
            return h
        if self.x is None or self.used & bit:  # no live input, or this member already had it: a new round
            self.hs = torch.bmm(xb, self.At).split(self.rank, dim=2)
            self.x, self.used = x, bit
            return self.hs[i]
        return torch.bmm(xb, self.parts[i])  # a different input while the group's is live


class SlotLinear(nn.Module):
    """An nn.Linear plus a per-row LoRA delta read from the shared slot storage.

    Per decode step the delta costs two kernels: the rows' A/B are gathered once per batch
    composition (not per step), then ``bmm`` + fused ``baddbmm`` (or ``matmul`` + ``addmm``);
    in a mixed batch the ``bmm`` is shared with the module's :class:`_ShrinkGroup` siblings.
    """

    def __init__(self, base_layer: nn.Linear, state: _RowState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._state = state
        self.A: torch.Tensor | None = None  # [slots+1, r, in] view
        self.BT: torch.Tensor | None = None  # [slots+1, r, out] view
        self.G: torch.Tensor | None = None  # [slots+1, 1, out] view of DoRA's g - 1 (layouts with DoRA only)
        self._group = _ShrinkGroup([self])  # replaced by LoraSlots when the module has siblings
        self._gidx = 0

    # Code that inspects the wrapped layer (dtype checks, tying) still finds its parameters.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step is bound by Python/launch overhead, not FLOPs: every op here counts (x 224 modules).
        st = self._state
        if kernel_step(st, x, self._group):
            return self._group.kernel_outputs(self._gidx, x, st)  # a decode step: one token per row
        base = self.base_layer
        y = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)
        if st.mode == "base" or self.A is None:
            return y
        inplace = not torch.is_grad_enabled()  # y is fresh; fold the delta in without another kernel
        if st.mode == "single":
            a, bt = self.A[st.slot], self.BT[st.slot]
            h = (x @ a.t()).reshape(-1, a.shape[0])
            y2 = y.reshape(-1, y.shape[-1])
            y2 = y2.addmm_(h, bt) if inplace else torch.addmm(y2, h, bt)
            if st.dora:
                y2 = self._dora(y2, self.G[st.slot], inplace)
            return y2.reshape(y.shape)
        g = self._group
        if g.version != st.version:
            g.gather(st)
        bt = g.BT[self._gidx]
        b = bt.shape[0]
        if x.dim() == 3 and x.shape[0] == b:  # [batch, tokens, features]: no reshapes needed
            h = g.shrink(self._gidx, x, x, st)
            y = y.baddbmm_(h, bt) if inplace else torch.baddbmm(y, h, bt)
            return self._dora(y, g.G[self._gidx], inplace) if st.dora else y
        h = g.shrink(self._gidx, x, x.reshape(b, -1, x.shape[-1]), st)
        y3 = y.reshape(b, -1, y.shape[-1])
        y3 = y3.baddbmm_(h, bt) if inplace else torch.baddbmm(y3, h, bt)
        return (self._dora(y3, g.G[self._gidx], inplace) if st.dora else y3).reshape(y.shape)

    def _dora(self, y: torch.Tensor, gm1: torch.Tensor, inplace: bool) -> torch.Tensor:
        """DoRA: ``bias + g * (y - bias)`` as ``y + (g - 1) * (y - bias)`` (exact for LoRA rows: g - 1 = 0)."""
        bias = self.base_layer.bias
        pre = y if bias is None else y - bias
        return y.addcmul_(pre, gm1) if inplace else torch.addcmul(y, pre, gm1)


class LoraSlots:
    """``num_slots`` LoRA slots over one model (slot 0 is the base; adapters use 1..num_slots)."""

    def __init__(self, model: nn.Module, num_slots: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.layout = EMPTY_LAYOUT
        self.storage = torch.zeros(num_slots + 1, 0, device=device, dtype=dtype)
        self._state = _RowState()
        self._wrapped: dict[str, SlotLinear] = {}
        self._dora_slots: set[int] = set()
        self.generation = 0  # bumped when the storage is re-allocated (captured steps read the old one)
        self.fused: dict[str, int] = {}  # what lora_fusion fused into the norms and MLPs (kernels only)
        # Mixed-batch decode through lora_triton where it runs (CUDA with Triton); gathers + bmm elsewhere.
        self.kernels = lora_triton.available(device)

    @property
    def kernels(self) -> bool:
        return self._kernels

    @kernels.setter
    def kernels(self, on: bool) -> None:
        self._kernels = on
        if on:
            self._fuse()

    def _fuse(self) -> None:
        self.fused = fuse(self.model, self._wrapped, self._state)

    def apply_layout(self, layout: SlotLayout) -> None:
        """Re-allocate the storage for ``layout`` (all slots emptied) and wrap any new target modules."""
        self.storage = torch.zeros(self.num_slots + 1, layout.numel, device=self.device, dtype=self.dtype)
        self.generation += 1
        for w in self._wrapped.values():  # the steps captured over the old storage are not replayed again
            w._group.fixed.clear()
        self._dora_slots.clear()
        named = dict(self.model.named_modules())
        offsets, gain_offsets = layout.offsets, layout.gain_offsets
        for name, fin, fout in layout.modules:
            wrapper = self._wrapped.get(name)
            if wrapper is None:
                parent_name, _, child = name.rpartition(".")
                wrapper = SlotLinear(named[name], self._state)
                setattr(named[parent_name] if parent_name else self.model, child, wrapper)
                self._wrapped[name] = wrapper
            a_off, b_off = offsets[name]
            wrapper.A = self.storage[:, a_off:a_off + layout.rank * fin].view(-1, layout.rank, fin)
            wrapper.BT = self.storage[:, b_off:b_off + layout.rank * fout].view(-1, layout.rank, fout)
            g_off = gain_offsets.get(name)
            wrapper.G = None if g_off is None else self.storage[:, g_off:g_off + fout].view(-1, 1, fout)
        self._group_siblings(named)
        self.layout = layout
        if self.kernels:
            self._fuse()

    def _group_siblings(self, named: dict[str, nn.Module]) -> None:
        """Give wrapped siblings that read the same input (see _SHARED_INPUT) one _ShrinkGroup."""
        order = {name: i for i, name in enumerate(named)}  # registration order: q before k before v
        groups: dict[tuple[str, int, int], list[SlotLinear]] = {}
        for name in sorted(self._wrapped, key=lambda n: order.get(n, -1)):
            parent, _, child = name.rpartition(".")
            w = self._wrapped[name]
            fam = next((i for i, names in enumerate(_SHARED_INPUT) if child in names), None)
            key = (name, -1, 0) if fam is None else (parent, fam, w.in_features)
            groups.setdefault(key, []).append(w)
        for members in groups.values():
            group = _ShrinkGroup(members)
            group.locate(self.storage)
            for i, w in enumerate(members):
                w._group, w._gidx = group, i

    def write(self, slot: int, packed: torch.Tensor, *, dora: bool = False) -> None:
        """Copy a packed adapter into ``slot`` (one host-to-device copy; asynchronous from pinned memory)."""
        if not 1 <= slot <= self.num_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.num_slots}")
        self.storage[slot].copy_(packed, non_blocking=True)
        (self._dora_slots.add if dora else self._dora_slots.discard)(slot)

    def set_rows(self, slots: list[int], *, indexed: bool = False) -> None:
        """Route batch row i through slot ``slots[i]`` for the following forwards.

        ``indexed`` (for CUDA graphs): any adapter row means "mixed", and each row's A/B are gathered now into
        buffers kept per batch size, which a captured step reads when replayed (the gathers stay out of it).
        Call it again after writing a slot that a row uses.
        """
        st = self._state
        distinct = set(slots)
        st.dora = not distinct.isdisjoint(self._dora_slots)
        if distinct == {0} or not self._wrapped:
            st.mode, st.rows = "base", None
        elif len(distinct) == 1 and not indexed:
            st.mode, st.slot, st.rows = "single", slots[0], None
        else:
            st.mode = "mixed"
            rows = torch.tensor(slots, dtype=torch.long)
            if indexed:  # captured steps read the index buffer of their batch size: refresh it in place
                buf = st.fixed_rows.get(len(slots))
                if buf is None:
                    with torch.inference_mode(False):  # a normal tensor: refreshed in and out of inference mode
                        buf = st.fixed_rows[len(slots)] = torch.tensor(slots, dtype=torch.long, device=self.device)
                else:
                    buf.copy_(rows)
                st.rows = buf
            else:
                st.rows = rows.to(self.device)
        st.indexed = indexed
        st.kernels = self.kernels
        self.regather()

    def regather(self) -> None:
        """Gather each row's A/B again: now into the fixed buffers (indexed rows), else at the next forward."""
        st = self._state
        st.version += 1
        groups = {id(w._group): w._group for w in self._wrapped.values()}.values()
        for g in groups:  # drop the previous batch's gathers now, not at the next forward
            g.clear()
            if st.indexed and st.mode == "mixed" and not st.kernels:  # the kernels read the storage itself
                g.gather(st, fixed=True)

    @property
    def route_key(self) -> tuple[str, bool, int]:
        """What a captured decode step depends on besides its shapes: LoRA mode, DoRA, storage generation."""
        return self._state.mode, self._state.dora, self.generation

    @property
    def wrapped_modules(self) -> list[str]:
        return sorted(self._wrapped)

    @property
    def shrink_groups(self) -> list[list[str]]:
        """Wrapped modules whose mixed-batch shrinks share one ``bmm`` (groups of two or more)."""
        names = {id(w): n for n, w in self._wrapped.items()}
        seen, out = set(), []
        for w in self._wrapped.values():
            g = w._group
            if id(g) not in seen and len(g.members) > 1:
                seen.add(id(g))
                out.append([names[id(m)] for m in g.members])
        return out

    @property
    def shared_shrinks(self) -> int:
        """How many mixed-batch shrinks were served from a sibling's shared ``bmm`` so far."""
        return self._state.shared_shrinks

