"""The one-GEMM 4-bit forward's weight operand [W | s B | 0], built two ways, timed per 8B layer shape.

  cat     bitsandbytes' dequantize_4bit, then torch.cat with s B and the padding (nf4.py without nf4_triton)
  kernel  nf4_triton.wide_weight: the dequantized weights written straight into the wide buffer

Both must be equal bit for bit (checked here too). CUDA events, median of 50 calls after 5 warm-up calls; the
kernel at each tile in TILES (rows x 4-bit blocks per program, warps).

    python3 benchmarks/nf4_wide.py          # on the GPU machine
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TILES = [(8, 8, 4), (16, 8, 8), (4, 16, 4), (8, 16, 8), (32, 4, 8), (2, 32, 4)]
SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def timed(fn, n: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    import types

    import torch
    from bitsandbytes.functional import quantize_4bit

    from tunekit.backends.local import nf4, nf4_triton

    r = 16
    for name, (out_f, in_f) in SHAPES.items():
        w = (torch.randn(out_f, in_f, device="cuda") * 0.02).bfloat16()
        packed, qs = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        weight = types.SimpleNamespace(data=packed, quant_state=qs, device=packed.device)
        absmax = nf4.block_scales(qs)
        bs = (torch.randn(out_f, r, device="cuda") * 1e-3).bfloat16()
        width = nf4.wide_width(in_f, r)

        def cat():
            d = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", qs.shape, torch.bfloat16)
            return nf4.widen(d, bs, width)

        def kernel():
            return nf4_triton.wide_weight(weight, absmax, bs, width)

        def dequant_only():
            return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", qs.shape, torch.bfloat16)

        gb = out_f * in_f * 2.5 / 1e9  # 4-bit read + bf16 written
        t_cat, t_deq = timed(cat), timed(dequant_only)
        kernels = {}
        for rows, blocks, warps in TILES:
            nf4_triton.TILE.update(rows=rows, blocks=blocks, warps=warps)
            same = torch.equal(cat().view(torch.int16), kernel().view(torch.int16))
            kernels[f"{rows}x{blocks}/{warps}"] = round(timed(kernel), 4) if same else "NOT EQUAL"
        best = min((v, k) for k, v in kernels.items() if isinstance(v, float))
        print(json.dumps({"shape": name, "out": out_f, "in": in_f, "cat_ms": round(t_cat, 4),
                          "dequantize_only_ms": round(t_deq, 4), "kernel_ms": kernels, "best": best[1],
                          "best_GBps": round(gb / best[0] * 1e3, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
