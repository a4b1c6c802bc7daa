"""Two Triton kernels for the work 4-bit DoRA does beyond LoRA (nf4.py), each one pass over memory where torch
makes several.

* ``magnitude_grad(g, y, inv_mag)``: DoRA's magnitude gradient sum_t g[t, j] y[t, j] / m_j, summed in fp32 while
  g and y are read once. Torch's ``(g * y).sum(0, dtype=float32)`` writes the product as a third [tokens, out]
  tensor (rounding each product to bf16) and reads it back: 4 passes over [tokens, out] where this makes 2, per
  adapted layer in every backward (~22 GB of an 8B step's traffic at 4 x 2048 tokens).
* ``nf4_times_at(weights, absmax, a)``: W A^T for every DoRA layer of a forward pass (the norm's cross term),
  dequantizing the 4-bit W in registers. Torch writes each W dequantized (2 bytes per weight) and a skinny GEMM
  reads it back: ~31 GB per pass for an 8B model, where the 4-bit weights are 3.5 GB.

Both are exact to the torch path's precision (fp32 accumulation; W rounded to the compute dtype as the 4-bit
dequantization does before its GEMM) and are used on CUDA tensors when Triton imports (``available``); anything
else (CPU, no Triton, ``TUNING["enabled"] = False``) takes the torch expressions. On CPU the tests run them in
Triton's interpreter against those expressions.
"""

from __future__ import annotations

import functools
from typing import Any

TUNING: dict[str, Any] = {"enabled": True}  # False: the torch expressions (benchmarks' --dora-ab)
# programs per launch to aim for, splitting rows (col_dot) or inputs (nf4_at) into fp32 partials: several per SM
# of an H200 (132) for the narrowest layers (k/v: 1,024 outputs); nf4_at's partials are [L, splits, out, r]
_PROGRAMS_DOT, _PROGRAMS_AT = 1024, 512


def available(device: Any) -> bool:
    """Whether the kernels run for tensors on ``device`` (CUDA, or Triton's CPU interpreter in the tests)."""
    import os

    if not TUNING["enabled"] or not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def col_dot(g_ptr, y_ptr, s_ptr, out_ptr, T, N, stride_g, stride_y, ROWS_PER: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        # out[split, j] = s[j] * sum over this split's rows of g[t, j] * y[t, j] (fp32 partials, no atomics:
        # the sum over splits is in a fixed order). ROWS_PER is a power of two: few compiled variants.
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t0 in range(0, ROWS_PER, BLOCK_T):
            t = (split * ROWS_PER + t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            m = (t[:, None] < T) & (n[None, :] < N)
            gv = tl.load(g_ptr + t[:, None] * stride_g + n[None, :], mask=m, other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + t[:, None] * stride_y + n[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(gv * yv, axis=0)
        s = tl.load(s_ptr + n, mask=n < N, other=0.0)
        tl.store(out_ptr + split * N + n, acc * s, mask=n < N)

    @triton.jit
    def nf4_at(w_ptr, absmax_ptr, code_ptr, ae_ptr, ao_ptr, out_ptr, OUT, IN, RANK, BLOCKSIZE,
               K_PER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr):
        # partial[split, o, r] = sum over this split's inputs of W[o, i] A[r, i]. bitsandbytes packs two weights
        # per byte, the even input index in the high nibble, each block of BLOCKSIZE weights (row-major, within
        # one row) sharing one fp32 scale: the even and odd columns are two GEMMs with A's even and odd columns.
        pm = tl.program_id(0)
        split = tl.program_id(1)
        o = (pm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        r = tl.arange(0, BLOCK_R)
        half = IN // 2
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K_PER, BLOCK_KH):
            kh = split * K_PER + k0 + tl.arange(0, BLOCK_KH)  # byte column = input pair
            mw = (o[:, None] < OUT) & (kh[None, :] < half)
            byte = tl.load(w_ptr + o[:, None] * half + kh[None, :], mask=mw, other=0).to(tl.int32)
            scale = tl.load(absmax_ptr + (o[:, None] * IN + 2 * kh[None, :]) // BLOCKSIZE, mask=mw, other=0.0)
            hi = (tl.load(code_ptr + ((byte >> 4) & 15)) * scale).to(tl.uint32, bitcast=True)
            lo = (tl.load(code_ptr + (byte & 15)) * scale).to(tl.uint32, bitcast=True)
            # fp32 -> the nearest bf16 (ties to even), kept in fp32: what dequantize_4bit stores for a bf16
            # weight. By integer ops, as Triton's interpreter casts to bf16 by truncation.
            hi = ((hi + 0x7FFF + ((hi >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            lo = ((lo + 0x7FFF + ((lo >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            ma = (kh[:, None] < half) & (r[None, :] < RANK)
            ae = tl.load(ae_ptr + kh[:, None] * RANK + r[None, :], mask=ma, other=0.0).to(tl.float32)
            ao = tl.load(ao_ptr + kh[:, None] * RANK + r[None, :], mask=ma, other=0.0).to(tl.float32)
            # bf16 values are exact in tf32, so the tensor cores' tf32 products are exact, as a bf16 GEMM's are
            acc += tl.dot(hi, ae, input_precision="tf32") + tl.dot(lo, ao, input_precision="tf32")
        tl.store(out_ptr + (split * OUT + o[:, None]) * RANK + r[None, :], acc,
                 mask=(o[:, None] < OUT) & (r[None, :] < RANK))

    return col_dot, nf4_at


def magnitude_grad(g: Any, y: Any, inv_mag: Any) -> Any:
    """fp32 [out]: sum_t g[t, j] y[t, j] * inv_mag[j] for 2-D ``g``, ``y`` of one shape."""
    import torch

    if not available(g.device):
        return (g * y).sum(0, dtype=torch.float32) * inv_mag
    import triton

    g, y = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, y))
    T, N = g.shape
    block_n, block_t = 64, 32  # 128-byte rows of a 16-bit tensor per load
    cols = triton.cdiv(N, block_n)
    # split the rows so that narrow layers (k/v: 1,024 columns) still give enough programs
    rows_per = max(block_t, triton.next_power_of_2(triton.cdiv(T, max(1, _PROGRAMS_DOT // cols))))
    splits = triton.cdiv(T, rows_per)
    part = torch.empty(splits, N, dtype=torch.float32, device=g.device)
    _kernels()[0][(cols, splits)](g, y, inv_mag.float().contiguous(), part, T, N, g.stride(0), y.stride(0),
                                  ROWS_PER=rows_per, BLOCK_T=block_t, BLOCK_N=block_n)
    return part[0] if splits == 1 else part.sum(0)


def nf4_times_at(weights: list, absmax: list, a: Any, dequant: Any) -> Any:
    """[L, out, r] fp32: W_i A_i^T for the 4-bit weights ``weights`` (bitsandbytes Params4bit, one shape) with
    fp32 block scales ``absmax`` and ``a`` [L, r, in] in the compute dtype. ``dequant(weight, absmax, dtype)`` is
    the torch path (nf4.dequant)."""
    import torch

    L, R, IN = a.shape
    OUT = weights[0].quant_state.shape[0]
    # bf16 compute (QLoRA's) only: the kernel rounds W as dequantize_4bit does to bf16; its tf32 products are
    # exact for bf16 operands but would round fp32 ones
    if not available(a.device) or weights[0].quant_state.quant_type != "nf4" or a.dtype != torch.bfloat16:
        return torch.stack([torch.mm(dequant(w, s, a.dtype), a[i].t()).float()
                            for i, (w, s) in enumerate(zip(weights, absmax))])
    import triton

    block_m, block_kh = 64, 64
    block_r = max(16, triton.next_power_of_2(R))  # tl.dot's smallest N
    # A's even / odd input columns, as [L, in/2, r] (the B operand of the two GEMMs)
    ae = a[:, :, 0::2].transpose(1, 2).contiguous()
    ao = a[:, :, 1::2].transpose(1, 2).contiguous()
    rows = triton.cdiv(OUT, block_m)
    steps = triton.cdiv(IN // 2, block_kh)
    splits = max(1, min(steps, _PROGRAMS_AT // rows))
    k_per = triton.cdiv(steps, splits) * block_kh
    splits = triton.cdiv(IN // 2, k_per)
    part = torch.empty(L, splits, OUT, R, dtype=torch.float32, device=a.device)
    nf4_at = _kernels()[1]
    for i, (w, s) in enumerate(zip(weights, absmax)):
        qs = w.quant_state
        nf4_at[(rows, splits)](w.data, s, qs.code.to(device=a.device, dtype=torch.float32), ae[i], ao[i], part[i],
                               OUT, IN, R, qs.blocksize, k_per, BLOCK_M=block_m, BLOCK_KH=block_kh,
                               BLOCK_R=block_r)
    return part.sum(1)
