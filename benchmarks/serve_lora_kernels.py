"""Time the mixed-adapter LoRA side of one decode step, alone, on a GPU: lora_triton's kernels per launch shape
(lora_triton.TUNING) against the gathers + bmm path, replayed as a CUDA graph like the server's step.

8B-shaped layers (q/k/v 4096 -> 4096/1024/1024, o 4096 -> 4096, gate/up 4096 -> 14336, down 14336 -> 4096), rank 16,
16 rows on 16 distinct adapters, 32 layers; the base GEMMs are left out (they are the same on both paths).
Prints one JSON line per configuration and the fastest (copy it into lora_triton.TUNING).

    python3 benchmarks/serve_lora_kernels.py            # needs CUDA and Triton
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

GROUPS = ((4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,)))


def build(rank: int, slots: int, layers: int, dtype):
    import torch

    per_layer = [(fin, outs) for fin, outs in GROUPS]
    numel, layout = 0, []
    for fin, outs in per_layer * layers:
        a = [numel + j * rank * fin for j in range(len(outs))]
        numel += len(outs) * rank * fin
        b = []
        for o in outs:
            b.append(numel)
            numel += rank * o
        layout.append((fin, outs, a, b))
    storage = torch.randn(slots + 1, numel, device="cuda", dtype=dtype) * 0.02
    return storage, layout


def timed(fn, reps: int = 50) -> float:
    """Milliseconds per replay of ``fn`` captured as one CUDA graph."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="every combination (default: one setting at a time)")
    ap.add_argument("--fusion", action="store_true",
                    help="time lora_fusion's fused launches against the launches they replace (Liger's RMSNorm + "
                         "shrink; expand + Liger's SiLU*up + shrink), 32 layers of each")
    a = ap.parse_args()

    import torch

    from tunekit.serve.embedded import lora_triton

    if not (torch.cuda.is_available() and lora_triton.available(torch.device("cuda"))):
        print("needs CUDA and Triton", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    if a.fusion:
        return fusion(a, dtype)
    storage, layout = build(a.rank, a.rows, a.layers, dtype)
    rows = torch.arange(1, a.rows + 1, device="cuda")
    xs = {fin: torch.randn(a.rows, fin, device="cuda", dtype=dtype) for fin, _ in GROUPS}
    ys = [torch.zeros(a.rows * sum(outs), device="cuda", dtype=dtype) for _, outs, _, _ in layout]
    offs = [torch.tensor(aoff, device="cuda") for _, _, aoff, _ in layout]

    def kernels_step(metas):
        for (fin, outs, _, _), off, y, meta in zip(layout, offs, ys, metas):
            h = torch.empty(lora_triton.splits_for(fin), a.rows, a.rank * len(outs), device="cuda",
                            dtype=torch.float32)
            lora_triton.shrink(xs[fin], storage, off, a.rank, rows, h)
            lora_triton.expand(h, a.rank, storage, *meta, rows, y, gain=False)

    # the bmm path as the server runs it under graphs: A/B gathered once (outside the step), bmm + baddbmm per module
    gathered = []
    for fin, outs, aoff, boff in layout:
        at = torch.cat([storage[rows, o:o + a.rank * fin].view(a.rows, a.rank, fin) for o in aoff], 1).transpose(1, 2)
        bts = [storage[rows, o:o + a.rank * n].view(a.rows, a.rank, n) for o, n in zip(boff, outs)]
        gathered.append((fin, at, bts, [torch.zeros(a.rows, 1, n, device="cuda", dtype=dtype) for n in outs]))

    def bmm_step():
        for fin, at, bts, outs in gathered:
            hs = torch.bmm(xs[fin].unsqueeze(1), at).split(a.rank, dim=2)
            for h, bt, y in zip(hs, bts, outs):
                y.baddbmm_(h, bt)

    results = [{"path": "bmm", "ms_per_step": round(timed(bmm_step), 3)}]
    print(json.dumps(results[-1]), flush=True)
    default = dict(lora_triton.TUNING)
    grid = {"k_per": [256, 512, 1024, 2048], "block_k": [128, 256, 512], "block_n": [64, 128, 256, 512],
            "shrink_warps": [2, 4, 8], "expand_warps": [2, 4, 8]}
    if not a.full:
        configs = [default] + [{**default, k: v} for k, vs in grid.items() for v in vs if v != default[k]]
    else:
        configs = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    for cfg in configs:
        lora_triton.TUNING.update(cfg)
        metas = [lora_triton.expand_meta(list(outs), [a.rows * sum(outs[:j]) for j in range(len(outs))], boff, None,
                                         torch.device("cuda")) for _, outs, _, boff in layout]
        try:
            ms = timed(lambda: kernels_step(metas))
        except Exception as exc:  # a launch shape Triton refuses (e.g. too many registers): skip it
            print(json.dumps({"path": "triton", **cfg, "error": str(exc)[:200]}), flush=True)
            continue
        results.append({"path": "triton", **cfg, "ms_per_step": round(ms, 3)})
        print(json.dumps(results[-1]), flush=True)
    best = min((r for r in results if r["path"] == "triton"), key=lambda r: r["ms_per_step"])
    print(json.dumps({"best": best, "bmm_ms_per_step": results[0]["ms_per_step"]}), flush=True)
    lora_triton.TUNING.update(default)
    return 0


def fusion(a, dtype) -> int:
    """lora_fusion's two launches against what they replace, per 8B layer, over ``a.layers`` layers in one graph."""
    import torch
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunekit.serve.embedded import lora_triton

    hid, inter, r, b = 4096, 14336, a.rank, a.rows
    norm = LlamaRMSNorm(hid, eps=1e-5).cuda().to(dtype)
    _patch_rms_norm_module(norm)  # the server's norm: Liger's kernel
    # one slot row per layer group: q/k/v A, then gate/up A, gate/up B, down A
    qkv_a, gu_a, bg, bu, ad = 0, 3 * r * hid, 5 * r * hid, 5 * r * hid + r * inter, 5 * r * hid + 2 * r * inter
    numel = ad + r * inter
    storage = torch.randn(b + 1, numel, device="cuda", dtype=dtype) * 0.02
    rows = torch.arange(1, b + 1, device="cuda")
    x = torch.randn(b, hid, device="cuda", dtype=dtype)
    offs_qkv = torch.tensor([qkv_a + j * r * hid for j in range(3)], device="cuda")
    offs_gu = torch.tensor([gu_a, gu_a + r * hid], device="cuda")
    off_d = torch.tensor([ad], device="cuda")
    y = torch.randn(2 * b * inter, device="cuda", dtype=dtype)
    h_gu = torch.randn(lora_triton.splits_for(hid), b, 2 * r, device="cuda")
    gmeta = lora_triton.expand_meta([inter, inter], [0, b * inter], [bg, bu], None, torch.device("cuda"))

    def norm_unfused():
        for _ in range(a.layers):
            xn = norm(x)
            h = torch.empty(lora_triton.splits_for(hid), b, 3 * r, device="cuda")
            lora_triton.shrink(xn, storage, offs_qkv, r, rows, h)

    def norm_fused():
        for _ in range(a.layers):
            xn = torch.empty_like(x)
            h = torch.empty(lora_triton.splits_for(hid), b, 3 * r, device="cuda")
            lora_triton.norm_shrink(x, norm.weight, 1e-5, storage, offs_qkv, r, rows, xn, h)

    def mlp_unfused():
        for _ in range(a.layers):
            lora_triton.expand(h_gu, r, storage, *gmeta, rows, y, gain=False)
            g, u = y[:b * inter].view(b, inter), y[b * inter:].view(b, inter)
            act = LigerSiLUMulFunction.apply(g, u)
            hd = torch.empty(lora_triton.splits_for(inter), b, r, device="cuda")
            lora_triton.shrink(act, storage, off_d, r, rows, hd)

    def mlp_fused():
        for _ in range(a.layers):
            act = torch.empty(b, inter, device="cuda", dtype=dtype)
            hd = torch.empty(lora_triton.swiglu_splits(inter), b, r, device="cuda")
            lora_triton.expand_swiglu(h_gu, r, storage, rows, y, act, hd, gate=0,
                                      offsets={"bg": bg, "bu": bu, "ad": ad}, gain=False)

    default = dict(lora_triton.TUNING)
    for name, fn in (("norm_unfused", norm_unfused), ("mlp_unfused", mlp_unfused)):
        print(json.dumps({"path": name, "layers": a.layers, "ms": round(timed(fn), 3)}), flush=True)
    for warps in (1, 2, 4, 8):
        lora_triton.TUNING.update(default, shrink_warps=warps)
        print(json.dumps({"path": "norm_fused", "shrink_warps": warps, "ms": round(timed(norm_fused), 3)}), flush=True)
    for block, warps in itertools.product((64, 128, 256, 512), (1, 2, 4, 8)):
        lora_triton.TUNING.update(default, swiglu_block=block, swiglu_warps=warps)
        try:
            ms = round(timed(mlp_fused), 3)
        except Exception as exc:  # a launch shape Triton refuses
            ms = str(exc)[:120]
        print(json.dumps({"path": "mlp_fused", "swiglu_block": block, "swiglu_warps": warps, "ms": ms}), flush=True)
    lora_triton.TUNING.update(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
