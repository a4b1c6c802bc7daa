"""Mixed-batch LoRA decode kernels (Triton): each row reads its adapter straight from the slot storage.

Why: with 16 rows on 16 adapters, cuBLAS's batched ``bmm``/``baddbmm`` over per-row gathered A/B ran the
LoRA side of an 8B decode step in ~3 ms on an H200 for ~1.3 GB of adapter reads (~0.3 ms at the HBM's
bandwidth): batched GEMV shapes (M = 1 per row) are not what cuBLAS tunes for. These two kernels are the
BGMV pattern of Punica/S-LoRA (the one vLLM's LoRA kernels follow):

* ``shrink``: ``h[row] = x[row] @ A[slot[row]]^T`` for a group of siblings at once (each member's A found by its
  offset in a slot's row), split over the input dimension into fp32 partial sums (no atomics);
* ``expand``: ``y_m[row] += h_m[row] @ B_m[slot[row]]`` in place for every member ``m`` at once (their base
  outputs lie in one flat buffer), summing those partials first; DoRA's per-row gain is applied in the same pass.

Two more fold these into launches a Llama layer makes anyway (lora_fusion.py): ``norm_shrink`` (the RMSNorm before
a sibling group, and its shrink) and ``expand_swiglu`` (gate/up's expand, SiLU(gate) * up, and down's shrink).

No gathered copies of A/B exist at all, so a batch composition change costs nothing on the GPU.
Triton is imported lazily: CPU serving and machines without it keep the ``bmm`` path.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, s_ptr, off_ptr, slot_ptr, h_ptr, IN, RANK, stride_xb, stride_ss, stride_hs, stride_hb,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_PER: tl.constexpr):
        b = tl.program_id(0)
        m = tl.program_id(1)  # group member: its A starts at off[m] inside a slot's flat buffer
        ks = tl.program_id(2)
        base = s_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_ss + tl.load(off_ptr + m)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K_PER, BLOCK_K):  # this program's share of the input dimension
            k = ks * K_PER + k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + b * stride_xb + k, mask=k < IN, other=0.0).to(tl.float32)
            av = tl.load(base + r[:, None] * IN + k[None, :], mask=(r[:, None] < RANK) & (k[None, :] < IN),
                         other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(h_ptr + ks * stride_hs + b * stride_hb + m * RANK + r, acc, mask=r < RANK)

    @triton.jit
    def expand(h_ptr, s_ptr, meta_ptr, slot_ptr, y_ptr, RANK, stride_hs, stride_hb, stride_ss,
               MEMBERS: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, GAIN: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        nb = tl.program_id(1)  # a block of one member's outputs; meta rows: (first block, out, y, B, gain offsets)
        m = nb * 0  # an int32 scalar: the loop below carries it
        for j in range(1, MEMBERS):
            m += (nb >= tl.load(meta_ptr + j * 5)).to(tl.int32)
        row = meta_ptr + m * 5
        out = tl.load(row + 1)
        slot = s_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_ss
        r = tl.arange(0, BLOCK_R)
        s = tl.arange(0, SPLITS_P2)  # the sum over splits of this row's partials: one 2-D load, not a loop
        hm = (s[:, None] < SPLITS) & (r[None, :] < RANK)
        h = tl.sum(tl.load(h_ptr + s[:, None] * stride_hs + b * stride_hb + m * RANK + r[None, :], mask=hm,
                           other=0.0), axis=0)
        n = (nb - tl.load(row)) * BLOCK_N + tl.arange(0, BLOCK_N)
        bt = tl.load(slot + tl.load(row + 3) + r[:, None] * out + n[None, :],
                     mask=(r[:, None] < RANK) & (n[None, :] < out), other=0.0).to(tl.float32)
        yp = y_ptr + tl.load(row + 2) + b * out + n
        y = tl.load(yp, mask=n < out, other=0.0).to(tl.float32) + tl.sum(bt * h[:, None], axis=0)
        if GAIN:  # DoRA (no bias): y * g, as y + (g - 1) * y with g - 1 stored
            y += y * tl.load(slot + tl.load(row + 4) + n, mask=n < out, other=0.0).to(tl.float32)
        tl.store(yp, y.to(yp.dtype.element_ty), mask=n < out)

    @triton.jit
    def norm_shrink(x_ptr, w_ptr, xn_ptr, s_ptr, off_ptr, slot_ptr, h_ptr, IN, RANK, eps, stride_xb, stride_ss,
                    stride_hs, stride_hb, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_PER: tl.constexpr,
                    BLOCK_IN: tl.constexpr):
        # shrink's grid and partials, of RMSNorm(x) as Llama computes it: (x * rstd in fp32) in x's dtype, times w
        b = tl.program_id(0)
        m = tl.program_id(1)
        ks = tl.program_id(2)
        cols = tl.arange(0, BLOCK_IN)  # every program reads the whole row (from L2) for its rstd
        xr = tl.load(x_ptr + b * stride_xb + cols, mask=cols < IN, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xr * xr, axis=0) / IN + eps)
        base = s_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_ss + tl.load(off_ptr + m)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K_PER, BLOCK_K):
            k = ks * K_PER + k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + b * stride_xb + k, mask=k < IN, other=0.0).to(tl.float32)
            xn = (xv * rstd).to(xn_ptr.dtype.element_ty) * tl.load(w_ptr + k, mask=k < IN, other=0.0)
            tl.store(xn_ptr + b * IN + k, xn, mask=(k < IN) & (m == 0))  # member 0's programs write the norm
            av = tl.load(base + r[:, None] * IN + k[None, :], mask=(r[:, None] < RANK) & (k[None, :] < IN),
                         other=0.0).to(tl.float32)
            acc += tl.sum(av * xn.to(tl.float32)[None, :], axis=1)
        tl.store(h_ptr + ks * stride_hs + b * stride_hb + m * RANK + r, acc, mask=r < RANK)

    @triton.jit
    def expand_swiglu(h_ptr, s_ptr, slot_ptr, y_ptr, act_ptr, d_ptr, RANK, INTER, hg, hu, yg, yu, bg, bu, gg, gu, ad,
                      stride_hs, stride_hb, stride_ss, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                      GAIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        # expand of gate and up (same block of both), SiLU(gate) * up, and the down projection's shrink partial
        b = tl.program_id(0)
        nb = tl.program_id(1)
        slot = s_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_ss
        r = tl.arange(0, BLOCK_R)
        s = tl.arange(0, SPLITS_P2)
        hm = (s[:, None] < SPLITS) & (r[None, :] < RANK)
        hp = h_ptr + s[:, None] * stride_hs + b * stride_hb + r[None, :]
        h_g = tl.sum(tl.load(hp + hg, mask=hm, other=0.0), axis=0)
        h_u = tl.sum(tl.load(hp + hu, mask=hm, other=0.0), axis=0)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < INTER
        bm = (r[:, None] < RANK) & nm[None, :]
        rn = r[:, None] * INTER + n[None, :]
        g = tl.load(y_ptr + yg + b * INTER + n, mask=nm, other=0.0).to(tl.float32) + tl.sum(
            tl.load(slot + bg + rn, mask=bm, other=0.0).to(tl.float32) * h_g[:, None], axis=0)
        u = tl.load(y_ptr + yu + b * INTER + n, mask=nm, other=0.0).to(tl.float32) + tl.sum(
            tl.load(slot + bu + rn, mask=bm, other=0.0).to(tl.float32) * h_u[:, None], axis=0)
        if GAIN:
            g += g * tl.load(slot + gg + n, mask=nm, other=0.0).to(tl.float32)
            u += u * tl.load(slot + gu + n, mask=nm, other=0.0).to(tl.float32)
        dt = act_ptr.dtype.element_ty
        g = g.to(dt).to(tl.float32)  # rounded as the unfused path stores them, then SiLU in fp32 as Liger/torch do
        act = (g * tl.sigmoid(g)).to(dt) * u.to(dt)
        tl.store(act_ptr + b * INTER + n, act, mask=nm)
        av = tl.load(slot + ad + rn, mask=bm, other=0.0).to(tl.float32)
        tl.store(d_ptr + (nb * tl.num_programs(0) + b) * RANK + r, tl.sum(av * act.to(tl.float32)[None, :], axis=1),
                 mask=r < RANK)

    return shrink, expand, norm_shrink, expand_swiglu


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA with Triton importable)."""
    if device.type != "cuda":
        return False
    try:
        _kernels()
    except Exception:  # no triton, or one that cannot compile here: the bmm path serves
        return False
    return True


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Launch shapes, the fastest of benchmarks/serve_lora_kernels.py --full on an H200. Set before the first decode:
# the expand tables (expand_meta) are kept per sibling group and batch size.
TUNING = {"k_per": 512, "block_k": 512, "block_n": 128, "shrink_warps": 2, "expand_warps": 2, "swiglu_block": 128,
          "swiglu_warps": 1, "fuse": True}  # fuse: lora_fusion's norm + shrink and SwiGLU launches


def splits_for(in_features: int) -> int:
    """Split-K factor of the shrink: ``k_per`` inputs per program, so a batch of 16 fills the GPU's SMs."""
    return max(1, -(-in_features // TUNING["k_per"]))


def shrink(x: torch.Tensor, storage: torch.Tensor, a_offsets: torch.Tensor, rank: int, slots: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """``out[s, b, m*rank:(m+1)*rank]`` = split ``s`` of ``x[b] @ A_m[slots[b]]^T`` for every group member ``m``,
    whose A [rank, in] starts at ``a_offsets[m]`` in a slot's row of ``storage`` [slots, numel].
    ``x`` [batch, in] with unit stride on ``in``; ``out`` fp32 [splits, batch, members*rank]."""
    k_shrink = _kernels()[0]
    batch, fin = x.shape
    splits = out.shape[0]
    block_r = _pow2(rank)
    k_per = -(-fin // splits)
    block_k = min(TUNING["block_k"], _pow2(k_per))
    k_per = -(-k_per // block_k) * block_k
    grid = (batch, a_offsets.numel(), splits)
    k_shrink[grid](x, storage, a_offsets, slots, out, fin, rank, x.stride(0), storage.stride(0), out.stride(0),
                   out.stride(1), BLOCK_R=block_r, BLOCK_K=block_k, K_PER=k_per, num_warps=TUNING["shrink_warps"])
    return out


def expand_meta(outs: list[int], y_offsets: list[int], b_offsets: list[int], g_offsets: list[int] | None,
                device: torch.device) -> tuple[torch.Tensor, int]:
    """The expand kernel's member table and its number of output blocks (grid axis 1)."""
    block_n = TUNING["block_n"]
    rows, first = [], 0
    for i, out in enumerate(outs):
        rows.append([first, out, y_offsets[i], b_offsets[i], g_offsets[i] if g_offsets else 0])
        first += -(-out // block_n)
    return torch.tensor(rows, dtype=torch.int64, device=device), first


def expand(h: torch.Tensor, rank: int, storage: torch.Tensor, meta: torch.Tensor, blocks: int, slots: torch.Tensor,
           y: torch.Tensor, *, gain: bool) -> torch.Tensor:
    """For every member ``m`` (a row of ``meta``, see expand_meta): ``y_m[b] += h_m[b] @ B_m[slots[b]]`` in place,
    ``h_m`` the sum over splits of ``h[:, b, m*rank:(m+1)*rank]``; then ``y_m[b] *= g_m[slots[b]]`` (DoRA) with
    ``gain``. ``y`` is the flat buffer holding each member's [batch, out] output contiguously at its offset;
    B [rank, out] and the gains (g - 1) sit at their offsets in a slot's row of ``storage``."""
    k_expand = _kernels()[1]
    grid = (slots.shape[0], blocks)
    k_expand[grid](h, storage, meta, slots, y, rank, h.stride(0), h.stride(1), storage.stride(0),
                   MEMBERS=meta.shape[0], SPLITS=h.shape[0], SPLITS_P2=_pow2(h.shape[0]), GAIN=gain,
                   BLOCK_R=_pow2(rank), BLOCK_N=TUNING["block_n"], num_warps=TUNING["expand_warps"])
    return y


def norm_shrink(x: torch.Tensor, weight: torch.Tensor, eps: float, storage: torch.Tensor, a_offsets: torch.Tensor,
                rank: int, slots: torch.Tensor, xn: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`shrink` of ``xn = RMSNorm(x) * weight`` (Llama's: normalised in fp32, rounded to x's dtype, then
    times ``weight``), writing ``xn`` [batch, in] too: the norm before a sibling group and its shrink in one launch."""
    k = _kernels()[2]
    batch, fin = x.shape
    splits = out.shape[0]
    k_per = -(-fin // splits)
    block_k = min(TUNING["block_k"], _pow2(k_per))
    k_per = -(-k_per // block_k) * block_k
    k[(batch, a_offsets.numel(), splits)](
        x, weight, xn, storage, a_offsets, slots, out, fin, rank, eps, x.stride(0), storage.stride(0), out.stride(0),
        out.stride(1), BLOCK_R=_pow2(rank), BLOCK_K=block_k, K_PER=k_per, BLOCK_IN=_pow2(fin),
        num_warps=TUNING["shrink_warps"])
    return xn


def swiglu_splits(inter: int) -> int:
    """How many partials of the down projection's shrink :func:`expand_swiglu` writes (one per output block)."""
    return -(-inter // TUNING["swiglu_block"])


def expand_swiglu(h: torch.Tensor, rank: int, storage: torch.Tensor, slots: torch.Tensor, y: torch.Tensor,
                  act: torch.Tensor, down_h: torch.Tensor, *, gate: int, offsets: dict[str, int], gain: bool) -> None:
    """A Llama MLP's middle in one launch: gate's and up's LoRA expand (and DoRA gains) into their base outputs
    ``y`` (gate's then up's [batch, inter] in one flat buffer), ``act = SiLU(gate) * up`` [batch, inter], and the
    down projection's shrink of ``act`` as fp32 partials ``down_h`` [swiglu_splits(inter), batch, rank].
    ``gate``: the gate's member index in ``h`` and ``y`` (0 or 1); ``offsets``: B of gate/up ("bg", "bu"), their gains
    ("gg", "gu") and down's A ("ad") in a slot's row of ``storage``."""
    k = _kernels()[3]
    batch, inter = act.shape
    hg, hu = (0, rank) if gate == 0 else (rank, 0)
    block = TUNING["swiglu_block"]
    k[(batch, swiglu_splits(inter))](
        h, storage, slots, y, act, down_h, rank, inter, hg, hu, gate * batch * inter, (1 - gate) * batch * inter,
        offsets["bg"], offsets["bu"],
        offsets.get("gg", 0), offsets.get("gu", 0), offsets["ad"], h.stride(0), h.stride(1), storage.stride(0),
        SPLITS=h.shape[0], SPLITS_P2=_pow2(h.shape[0]), GAIN=gain, BLOCK_R=_pow2(rank), BLOCK_N=block,
        num_warps=TUNING["swiglu_warps"])
