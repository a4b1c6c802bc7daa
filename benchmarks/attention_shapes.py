"""What a new sequence length costs PyTorch's SDPA, per backend, forward + backward (GPU).

Padded batches of mixed-length rows get a new length almost every step (the batch's longest row). A backend that
builds a plan per shape (cuDNN's SDPA builds and caches a graph per shape) pays that at every new length. This
times, for each backend, the first call at each of several new lengths against a second call at the same length.
8B attention shape: 32 query heads, 8 KV heads (expanded, as transformers' sdpa path does for training), head dim
128, bf16, causal.

    python3 benchmarks/attention_shapes.py [--batch 4] [--lengths 700 1333 1901 517 2048 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[700, 1333, 1901, 517, 2048, 1024, 1555, 911])
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, backend in backends.items():
        rows = []
        for i, n in enumerate(a.lengths):
            n = n + 8 * 7 * list(backends).index(name)  # lengths no earlier backend has seen (no shared caches)
            q, k, v = (torch.randn(a.batch, 32, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                except RuntimeError as exc:
                    print(json.dumps({"backend": name, "error": str(exc)[:200]}), flush=True)
                    break
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            if len(times) == 2:
                rows.append({"length": n, "first_ms": round(times[0] * 1e3, 2), "again_ms": round(times[1] * 1e3, 2)})
        if rows:
            first = sum(r["first_ms"] for r in rows[1:]) / max(1, len(rows) - 1)  # row 0 also pays one-time setup
            again = sum(r["again_ms"] for r in rows[1:]) / max(1, len(rows) - 1)
            print(json.dumps({"backend": name, "rows": rows, "mean_first_ms_at_a_new_length": round(first, 2),
                              "mean_again_ms": round(again, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
