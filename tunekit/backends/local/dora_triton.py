"""DoRA's magnitude gradient as one Triton kernel (nf4.py's 4-bit DoRA backward), one pass over memory where torch
makes several.

``magnitude_grad(g, y, inv_mag)``: sum_t g[t, j] y[t, j] / m_j, summed in fp32 while g and y are read once.
Torch's ``(g * y).sum(0, dtype=float32)`` writes the product as a third [tokens, out] tensor (rounding each product
to bf16) and reads it back, per adapted layer in every backward. On the H200 (8B, 4 x 2048 tokens,
docs/benchmarks.md) the kernel took 20.8 ms of a step; torch's column reduction took 9.1 ms plus its share of
17.6 ms of multiplies (at most ~26 ms together).

Tried and removed (commit efb2303): W A^T with the 4-bit W dequantized in registers, for the DoRA norm. It read
the 4-bit weights only, but its per-weight table lookups and block-scale gathers ran 198 us per layer (44 ms per
step) where bitsandbytes' dequantization plus a cuBLAS GEMM take about 15 ms.

Used on CUDA tensors when Triton imports (``available``); anything else (CPU, no Triton, ``TUNING["enabled"] =
False``) takes the torch expression. On CPU the tests run the kernel in Triton's interpreter against it.
"""

from __future__ import annotations

import functools
from typing import Any

TUNING: dict[str, Any] = {"enabled": True}  # False: the torch expression (benchmarks' --dora-ab)
# programs per launch to aim for, splitting the rows into fp32 partials: several per SM of an H200 (132) for the
# narrowest layers (k/v: 1,024 outputs)
_PROGRAMS_DOT = 1024


def available(device: Any) -> bool:
    """Whether the kernel runs for tensors on ``device`` (CUDA, or Triton's CPU interpreter in the tests)."""
    import os

    if not TUNING["enabled"] or not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _importable()


@functools.lru_cache(maxsize=1)
def _importable() -> bool:  # asked in every DoRA backward: a failed import is not retried each time
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

    return col_dot


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
    _kernels()[(cols, splits)](g, y, inv_mag.float().contiguous(), part, T, N, g.stride(0), y.stride(0),
                                  ROWS_PER=rows_per, BLOCK_T=block_t, BLOCK_N=block_n)
    return part[0] if splits == 1 else part.sum(0)
