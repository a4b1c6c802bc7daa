"""The 4-bit weight dequantized straight into the wide operand of nf4.py's one-GEMM forward.

nf4.py's forward computes x W^T + h (s B)^T as one GEMM over [x | h] and [W | s B] (rounded once). bitsandbytes'
dequantization writes W as a contiguous [out, in] tensor, so [W | s B] took a second pass: torch.cat reads W back
and writes it again, 4 bytes per weight on top of the dequantization's 2.5 (about 13 ms of an 8B QLoRA step on an
H200, docs/benchmarks.md). This kernel writes each dequantized weight into its place in the wider [out, in + r + pad]
buffer instead, so W is written once; s B and the padding are [out, r + pad], a few columns.

The values are bitsandbytes' (fp32 code value times the fp32 block scale, rounded to bf16 to nearest, ties to
even): the GEMM sees the same operand. bf16 NF4 only, weights of MIN_WEIGHTS or more (the MLP's of an 8B model),
on CUDA when Triton imports (``available``); anything else takes torch.cat. On CPU the tests run it in Triton's interpreter against bitsandbytes' dequantization.
"""

from __future__ import annotations

import functools
from typing import Any

from . import dora_triton

TUNING: dict[str, Any] = {"enabled": True}  # False: torch.cat (an A/B switch for benchmarks)
# per program: rows x 4-bit blocks (4 x 1,024 weights: 2 KiB in, 8 KiB out), the fastest of benchmarks/nf4_wide.py's
# tiles on an H200 for every 8B shape
TILE = {"rows": 4, "blocks": 16, "warps": 4}
# weights below which torch.cat is as fast (the kernel's own launches cost what the copy saves): on the H200 the
# kernel took 0.094 vs 0.159 ms for a 14,336 x 4,096 weight, 0.076 vs 0.075 for 4,096 x 4,096, 0.073 vs 0.059 for
# 1,024 x 4,096 (benchmarks/nf4_wide.py)
MIN_WEIGHTS = 1 << 25


def available(weight: Any, dtype: Any) -> bool:
    import torch

    qs = weight.quant_state
    return (TUNING["enabled"] and dtype == torch.bfloat16 and qs.quant_type == "nf4"
            and qs.shape[0] * qs.shape[1] >= MIN_WEIGHTS
            and qs.shape[1] % qs.blocksize == 0 and qs.blocksize in (64, 128, 256) and dora_triton.available(weight.device))


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_into(w_ptr, absmax_ptr, code_ptr, out_ptr, OUT, IN, LD, BLOCK_M: tl.constexpr, NB: tl.constexpr,
                 BLOCKSIZE: tl.constexpr):
        # out[o, i] for i < IN (row stride LD): two weights per byte, the even input index in the high nibble, each
        # BLOCKSIZE weights of a row sharing one fp32 scale (bitsandbytes' layout). A program takes BLOCK_M rows x
        # NB blocks: [BLOCK_M, NB, BLOCKSIZE / 2] bytes and one scale per [row, block].
        HB: tl.constexpr = BLOCKSIZE // 2
        o = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        blk = tl.program_id(1) * NB + tl.arange(0, NB)
        j = tl.arange(0, HB)
        nblk = IN // BLOCKSIZE
        mrow = (o[:, None] < OUT) & (blk[None, :] < nblk)  # [BLOCK_M, NB]
        scale = tl.load(absmax_ptr + o[:, None] * nblk + blk[None, :], mask=mrow, other=0.0)
        byte_at = (o[:, None, None] * (IN // 2) + blk[None, :, None] * HB + j[None, None, :])
        m3 = mrow[:, :, None]
        byte = tl.load(w_ptr + byte_at, mask=m3, other=0).to(tl.int32)
        hi = (tl.load(code_ptr + (byte >> 4)) * scale[:, :, None]).to(tl.uint32, bitcast=True)
        lo = (tl.load(code_ptr + (byte & 15)) * scale[:, :, None]).to(tl.uint32, bitcast=True)
        # fp32 -> the nearest bf16 (ties to even) by integer ops, as Triton's interpreter casts by truncation
        hi = ((hi + 0x7FFF + ((hi >> 16) & 1)) >> 16).to(tl.uint16)
        lo = ((lo + 0x7FFF + ((lo >> 16) & 1)) >> 16).to(tl.uint16)
        pair = tl.interleave(hi, lo)  # [BLOCK_M, NB, BLOCKSIZE]: the even and odd inputs in order
        col = blk[None, :, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, None, :]
        tl.store(out_ptr + o[:, None, None] * LD + col, pair, mask=m3)

    return nf4_into


def wide_weight(weight: Any, absmax: Any, bs: Any, width: int) -> Any:
    """[out, width] bf16: [W | bs | 0], W the 4-bit ``weight`` dequantized with the fp32 block scales ``absmax``."""
    import torch
    import triton

    qs = weight.quant_state
    out_f, in_f = qs.shape
    buf = torch.empty(out_f, width, dtype=torch.bfloat16, device=weight.device)
    rows, blocks = TILE["rows"], TILE["blocks"]
    grid = (triton.cdiv(out_f, rows), triton.cdiv(in_f // qs.blocksize, blocks))
    _kernel()[grid](weight.data, absmax, qs.code.to(device=weight.device, dtype=torch.float32),
                    buf.view(torch.uint16), out_f, in_f, width, BLOCK_M=rows, NB=blocks, BLOCKSIZE=qs.blocksize,
                    num_warps=TILE["warps"])
    r = bs.shape[1]
    buf[:, in_f:in_f + r] = bs
    if width > in_f + r:
        buf[:, in_f + r:] = 0
    return buf
