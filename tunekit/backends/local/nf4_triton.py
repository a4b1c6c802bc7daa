"""The 4-bit weight dequantized straight into the wide operand of nf4.py's one-GEMM forward.

nf4.py's forward computes x W^T + h (s B)^T as one GEMM over [x | h] and [W | s B] (rounded once). bitsandbytes'
dequantization writes W as a contiguous [out, in] tensor, so [W | s B] took a second pass: torch.cat reads W back
and writes it again, 4 bytes per weight on top of the dequantization's 2.5 (about 13 ms of an 8B QLoRA step on an
H200, docs/benchmarks.md). This kernel writes each dequantized weight into its place in the wider [out, in + r + pad]
buffer instead, so W is written once; s B and the padding are [out, r + pad], a few columns.

The values are bitsandbytes' (fp32 code value times the fp32 block scale, rounded to bf16 to nearest, ties to
even): the GEMM sees the same operand. bf16 NF4 only, on CUDA when Triton imports (``available``); anything else
takes torch.cat. On CPU the tests run it in Triton's interpreter against bitsandbytes' dequantization.
"""

from __future__ import annotations

import functools
from typing import Any

from . import dora_triton

TUNING: dict[str, Any] = {"enabled": True}  # False: torch.cat (an A/B switch for benchmarks)
_BLOCK_M, _BLOCK_KH = 16, 128  # rows x byte columns per program: 16 x 256 weights, 4 KiB read, 8 KiB written


def available(weight: Any, dtype: Any) -> bool:
    import torch

    qs = weight.quant_state
    return (TUNING["enabled"] and dtype == torch.bfloat16 and qs.quant_type == "nf4" and qs.shape[1] % 2 == 0
            and dora_triton.available(weight.device))


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_into(w_ptr, absmax_ptr, code_ptr, out_ptr, OUT, IN, LD, BLOCKSIZE, BLOCK_M: tl.constexpr,
                 BLOCK_KH: tl.constexpr):
        # out[o, i] for i < IN (row stride LD): two weights per byte, the even input index in the high nibble, each
        # BLOCKSIZE weights of a row sharing one fp32 scale (bitsandbytes' layout)
        o = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        kh = tl.program_id(1) * BLOCK_KH + tl.arange(0, BLOCK_KH)
        half = IN // 2
        m = (o[:, None] < OUT) & (kh[None, :] < half)
        byte = tl.load(w_ptr + o[:, None] * half + kh[None, :], mask=m, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (o[:, None] * IN + 2 * kh[None, :]) // BLOCKSIZE, mask=m, other=0.0)
        hi = (tl.load(code_ptr + ((byte >> 4) & 15)) * scale).to(tl.uint32, bitcast=True)
        lo = (tl.load(code_ptr + (byte & 15)) * scale).to(tl.uint32, bitcast=True)
        # fp32 -> the nearest bf16 (ties to even) by integer ops, as Triton's interpreter casts by truncation
        hi = ((hi + 0x7FFF + ((hi >> 16) & 1)) >> 16).to(tl.uint16)
        lo = ((lo + 0x7FFF + ((lo >> 16) & 1)) >> 16).to(tl.uint16)
        pair = tl.interleave(hi, lo)  # [BLOCK_M, 2 BLOCK_KH]: the even and odd input columns in order
        i = tl.program_id(1) * 2 * BLOCK_KH + tl.arange(0, 2 * BLOCK_KH)
        tl.store(out_ptr + o[:, None] * LD + i[None, :], pair, mask=(o[:, None] < OUT) & (i[None, :] < IN))

    return nf4_into


def wide_weight(weight: Any, absmax: Any, bs: Any, width: int) -> Any:
    """[out, width] bf16: [W | bs | 0], W the 4-bit ``weight`` dequantized with the fp32 block scales ``absmax``."""
    import torch
    import triton

    qs = weight.quant_state
    out_f, in_f = qs.shape
    buf = torch.empty(out_f, width, dtype=torch.bfloat16, device=weight.device)
    grid = (triton.cdiv(out_f, _BLOCK_M), triton.cdiv(in_f // 2, _BLOCK_KH))
    _kernel()[grid](weight.data, absmax, qs.code.to(device=weight.device, dtype=torch.float32),
                    buf.view(torch.uint16), out_f, in_f, width, qs.blocksize, BLOCK_M=_BLOCK_M, BLOCK_KH=_BLOCK_KH)
    r = bs.shape[1]
    buf[:, in_f:in_f + r] = bs
    if width > in_f + r:
        buf[:, in_f + r:] = 0
    return buf
