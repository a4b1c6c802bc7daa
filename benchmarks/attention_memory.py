"""What one attention call costs on the GPU: the terms tunekit/backends/local/attention.py counts (the memory
estimate's ``attention_mask`` / ``attention_scores``).

    python benchmarks/attention_memory.py [--seq 2048 16384] [--batch 4 1]     # CUDA only

Calls torch's scaled_dot_product_attention the way transformers 5.x's sdpa path does (integrations/
sdpa_attention.py) on the Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128):
  gqa       no mask, is_causal, enable_gqa (one unpadded row or equal-length rows)
  masked    a [B, 1, S, S] boolean mask (padded or packed rows): K/V repeated to 32 heads, is_causal False
each with fp32 q/k/v (the plain recipe: prepare_model_for_kbit_training's fp32 stream, no autocast), bf16, and
fp32 under bf16 autocast (the Trainer with bf16=True). Per case: the backend that accepts it alone (flash,
efficient, cudnn, math), the bytes kept for backward after two calls (two layers), and the peak above the inputs
over forward + backward of one call. One JSON line per case.
"""

from __future__ import annotations

import argparse
import json


def case(B: int, S: int, kind: str, dtype: str, autocast: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    dev = "cuda"
    H, KV, D = 32, 8, 128

    def inputs():
        q = torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(B, KV, S, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, KV, S, D, device=dev, dtype=dt, requires_grad=True)
        return q, k, v

    mask = None
    if kind == "masked":  # rows padded at the end: the mask transformers builds (causal and padding)
        mask = torch.ones(S, S, device=dev, dtype=torch.bool).tril().expand(B, 1, S, S).clone()
        mask[0, :, :, S - 8:] = False

    def call(q, k, v):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        k2, v2 = (t[:, :, None].expand(B, KV, H // KV, S, D).reshape(B, H, S, D) for t in (k, v))
        return F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, is_causal=False)

    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)
    accepted = []
    for name, b in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        if name == "math" and accepted:
            break  # math always works; only tried when nothing else does (it may not fit)
        try:
            q, k, v = (t.detach()[:, :, :64].clone() for t in inputs())  # a short probe: which kernel accepts
            with sdpa_kernel([b]), ctx:
                if mask is None:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                else:
                    qs = q
                    ks, vs = (t[:, :, None].expand(B, KV, H // KV, 64, D).reshape(B, H, 64, D) for t in (k, v))
                    F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, :, :64, :64], is_causal=False)
            accepted.append(name)
        except RuntimeError:
            pass
    out: dict = {"batch": B, "seq": S, "kind": kind, "dtype": dtype, "autocast": autocast, "accepts": accepted,
                 "mask_bytes": 0 if mask is None else mask.numel()}
    torch.cuda.synchronize()
    try:
        q, k, v = inputs()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with ctx:
            o1 = call(q, k, v)
            o2 = call(q, k, v)  # a second layer: what each call keeps for backward
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - base
        out["kept_two_calls"] = kept
        del o2
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base1 = torch.cuda.memory_allocated()
        o1.float().sum().backward()
        torch.cuda.synchronize()
        out["backward_peak_above"] = torch.cuda.max_memory_allocated() - base1
        del o1
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base2 = torch.cuda.memory_allocated()
        with ctx:
            o = call(q, k, v)
        o.float().sum().backward()
        torch.cuda.synchronize()
        out["fwd_bwd_peak_above"] = torch.cuda.max_memory_allocated() - base2
    except torch.OutOfMemoryError as exc:
        out["oom"] = str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.empty_cache()
    for key in ("kept_two_calls", "backward_peak_above", "fwd_bwd_peak_above"):
        if key in out:
            out[key + "_gib"] = round(out[key] / 2**30, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 1], help="one per --seq")
    a = ap.parse_args()
    import torch

    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}), flush=True)
    for S, B in zip(a.seq, a.batch):
        for kind in ("gqa", "masked"):
            for dtype, autocast in (("fp32", False), ("bf16", False), ("fp32", True)):
                print(json.dumps(case(B, S, kind, dtype, autocast)), flush=True)


if __name__ == "__main__":
    main()
