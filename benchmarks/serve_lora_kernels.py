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
    a = ap.parse_args()

    import torch

    from tunekit.serve.embedded import lora_triton

    if not (torch.cuda.is_available() and lora_triton.available(torch.device("cuda"))):
        print("needs CUDA and Triton", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
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


if __name__ == "__main__":
    sys.exit(main())
