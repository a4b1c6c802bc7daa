"""The memory estimate (tunekit/backends/local/memory.py) against every peak recorded in docs/benchmarks.md.

    python benchmarks/memory_estimate.py [--markdown]
    python benchmarks/memory_estimate.py --run qlora 4 2048 24 [--dropout 0.05] [--offload N]
        # one new run: variant (qlora dora auto speedups_off), micro-batch, seq, checkpointed layers (and the run's
        # offloaded layers) -> the estimate to put beside its measured peak

Pure arithmetic, no GPU. Every row is a run recorded in docs/benchmarks.md on the H200: Llama-3.1-8B shape, r=16
all-linear, peak = torch.cuda.max_memory_allocated(), compared with the estimate's allocated part (weights +
adapter + activations, at the run's recorded number of checkpointed layers: memory.kept_layers_peak); the plan's
own figure adds the CUDA context and allocator slack (the "plan" column). tests/test_local_memory.py asserts the
same table.

Status of a row:
  derived   looked at while the estimate's terms were counted (nothing is fitted: no free factor)
  held out  not looked at: a check of the terms
  old code  measured on code since changed in a way the estimate no longer describes (what changed is said)
  no model  a configuration tunekit does not run (the estimate has no arguments for it)
  not covered  a cost the estimate does not count (said where; the estimate is below the measurement there)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunekit.backends.local.memory import GiB, _estimate, kept_layers_peak  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
H200 = 143771 * 2**20  # torch's total_memory of the H200 the figures were taken on
# the estimate arguments of each path: the plain recipe (prepare_model_for_kbit_training, full logits), tunekit's
# CUDA path (speed.estimate_kwargs: chunked head, bf16 QLoRA, Liger + fused LoRA) and tunekit with speedups off
PLAIN = dict(fused_lm_head=False, kbit_upcast=True, fused_kernels=False)
FUSED = dict(fused_lm_head=True, kbit_upcast=False, fused_kernels=True)
SPEEDUPS_OFF = dict(fused_lm_head=True, kbit_upcast=True, fused_kernels=False)
# FUSED is the code of the runs recorded until 2026-12-04 (8-bit AdamW for QLoRA, the SwiGLU's output kept for
# down_proj); FUSED_MLP since 4cd7dd8: fp32 AdamW state (resolve.optimizer_name) and the fused MLP
# (kernels.fuse_swiglu_down)
FUSED_MLP = dict(FUSED, fused_mlp=True, optimizer_state_bytes=8)
FUSED_NOW = dict(FUSED_MLP, recompute_norms=True)  # and the normed hidden states recomputed (recompute.py)

# (name, path, quantization, dora, micro-batch, seq, checkpointed layers (or (checkpointed, MLP-recomputing layers)),
#  measured GiB (None: out of memory), status, source: docs/benchmarks.md section / commit)
POINTS = [
    ("plain qlora", PLAIN, "nf4", False, 4, 2048, 32, 27.3, "derived", "Reference figures; 27.31 in each run"),
    ("plain bf16 lora", PLAIN, "none", False, 4, 2048, 32, 31.3, "derived", "Reference figures"),
    ("plain bf16 lora, no ckpt", PLAIN, "none", False, 4, 2048, 0, 104.7, "derived", "Reference figures"),
    ("plain qlora, no ckpt", PLAIN, "nf4", False, 4, 2048, 0, None, "derived", "Reference figures: out of memory"),
    ("plain qlora+dora", PLAIN, "nf4", True, 4, 2048, 32, 27.32, "held out", "72a9a4c, a589fb1"),
    ("tunekit qlora", FUSED, "nf4", False, 4, 2048, 27, 13.22, "derived", "72a9a4c, 6a13560; 13.23 a589fb1"),
    ("tunekit auto (bf16)", FUSED, "none", False, 4, 2048, 0, 50.16, "derived", "72a9a4c; 50.2 c86653f"),
    ("tunekit dora", FUSED, "nf4", True, 4, 2048, 27, 14.36, "derived",
     "6a13560, a589fb1; measured before the q/k DoRA copy for Liger's RoPE (counted since: +2.4% now)"),
    ("tunekit qlora 16k", FUSED, "nf4", False, 1, 16384, 31, 12.48, "derived", "Long context, tree of 897443e"),
    ("tunekit auto (bf16) 16k", FUSED, "none", False, 1, 16384, 0, 84.6, "held out",
     "issue 16 (c86653f; 0/32: the plan of that code)"),
    ("tunekit qlora, speedups off", SPEEDUPS_OFF, "nf4", False, 4, 2048, 32, 14.80, "held out",
     "6ae2d2a (its LoRA weights bf16: TRL's cast, since undone: +0.16 GiB now)"),
    ("tunekit dora 29/32 (per-call norms)", FUSED, "nf4", True, 4, 2048, 29, 11.59, "held out",
     "72a9a4c (DoRA values per call, batched per pass since 6a13560; no q/k DoRA copy then, counted since)"),
    ("tunekit qlora (fp32 LoRA input copy)", FUSED, "nf4", False, 4, 2048, 30, 10.96, "old code",
     "aab2307: bitsandbytes + PEFT forward with an fp32 copy of x, removed in 72a9a4c"),
    ("tunekit dora (fp32 LoRA input copy)", FUSED, "nf4", True, 4, 2048, 30, 12.75, "old code", "aab2307: same"),
    ("tunekit qlora (bf16 adapters, fp32 copy)", FUSED, "nf4", False, 4, 2048, 30, 10.06, "old code",
     "6ae2d2a: also bf16 LoRA weights (fp32 since 4bfadd4)"),
    ("tunekit dora (stale norm, fp32 copy)", FUSED, "nf4", True, 4, 2048, 30, 12.71, "old code", "6ae2d2a"),
    ("tunekit auto (bf16, fp32 copy)", FUSED, "none", False, 4, 2048, 0, 58.50, "old code",
     "6ae2d2a: fp32 copy of the LoRA input (8.3 GiB over 32 layers), removed in 72a9a4c"),
    ("plain qlora + Liger", None, "nf4", False, 4, 2048, 32, 20.2, "no model",
     "Reference figures: Liger's fused linear cross-entropy with PEFT's LoRA forward"),
    ("plain bf16 lora, no ckpt, + Liger", None, "none", False, 4, 2048, 0, 78.2, "no model", "Reference figures"),
    ("tunekit qlora 25/32", FUSED, "nf4", False, 4, 2048, 25, 15.26, "held out", "QLoRA and DoRA at 4 x 2048, 40cb1b8"),
    ("tunekit dora 26/32", FUSED, "nf4", True, 4, 2048, 26, 16.04, "held out", "QLoRA and DoRA at 4 x 2048, 40cb1b8"),
    ("tunekit qlora 8k", FUSED, "nf4", False, 1, 8192, 0, 40.66, "held out", "Long context sweep, d94002f"),
    ("tunekit qlora 16k, no ckpt", FUSED, "nf4", False, 1, 16384, 0, 75.04, "held out", "Long context sweep, d94002f"),
    ("tunekit qlora 32k", FUSED, "nf4", False, 1, 32768, 6, 119.80, "held out", "Long context sweep, d94002f"),
    ("tunekit qlora 64k", FUSED, "nf4", False, 1, 65536, 20, 120.81, "held out", "Long context sweep, d94002f"),
    ("tunekit qlora 128k", FUSED, "nf4", False, 1, 131072, 28, 107.09, "held out", "Long context sweep, d94002f"),
    ("tunekit qlora 256k", FUSED, "nf4", False, 1, 262144, 31, 112.03, "held out", "Long context sweep, d94002f"),
    ("tunekit qlora, mixed lengths padded 25/32", {**FUSED, "attention_mask": "padded"}, "nf4", False, 4, 2048, 25,
     15.84, "held out", "QLoRA/DoRA after the torch.cat operands ..., 5fe211a (the longest batch: 4 x 2048)"),
    ("tunekit qlora, packed, masked sdpa 26/32", {**FUSED, "attention_mask": "packed"}, "nf4", False, 4, 2048, 26,
     15.61, "held out", "QLoRA/DoRA after the torch.cat operands ..., 5fe211a"),
    ("tunekit qlora, packed, varlen 26/32", {**FUSED, "attention_mask": "varlen"}, "nf4", False, 4, 2048, 26, 14.80,
     "held out", "Packed rows through varlen flash attention, 43263de; its term (K/V repeated for torch 2.11's "
     "kernel, which takes no grouped heads) was written after this run was seen"),
    ("tunekit qlora 384k, 16 offloaded", {**FUSED, "offload_layers": 16}, "nf4", False, 1, 393216, 32, 121.61,
     "held out", "Long context: 393,216 tokens, 01b888b (the plan's own offload of 16 layers' inputs)"),
    ("tunekit qlora, fused MLP + fp32 AdamW 23/32", FUSED_MLP, "nf4", False, 4, 2048, 23, 15.76, "derived",
     "Issue 16, 2026-12-04 (third session), 4cd7dd8 (held out for its terms; -1.0% before the recompute "
     "transient was counted)"),
    ("tunekit dora, fused MLP + fp32 AdamW 25/32", FUSED_MLP, "nf4", True, 4, 2048, 25, 16.32, "derived",
     "Issue 16, 2026-12-04 (third session), 4cd7dd8 (-2.9% before the recompute transient was counted)"),
    ("tunekit qlora, + recompute_norms 22/32", FUSED_NOW, "nf4", False, 4, 2048, 22, 15.44, "derived",
     "Issue 16, 2026-12-04 (third session), bab30c3 (-1.9% before the recompute transient was counted)"),
    ("tunekit dora, + recompute_norms 25/32", FUSED_NOW, "nf4", True, 4, 2048, 25, 15.44, "derived",
     "Issue 16, 2026-12-04 (third session), bab30c3 (-3.0% before the recompute transient was counted)"),
    ("tunekit qlora 128k, + recompute_norms 25/32", FUSED_NOW, "nf4", False, 1, 131072, 25, 122.05, "derived",
     "Issue 16, 2026-12-04 (third session), bab30c3 (-5.0% before the recompute transient was counted)"),
    ("tunekit auto (bf16), + recompute_norms", FUSED_NOW, "none", False, 4, 2048, 0, 46.22, "held out",
     "Issue 16, 2026-12-04 (third session), 826cb1f (50.16 without it)"),
    ("tunekit qlora, + recompute_mlp 12/32 +18", FUSED_NOW, "nf4", False, 4, 2048, (12, 18), 14.31, "held out",
     "Issue 16, 2026-12-04 (fourth session), f84e010"),
    ("tunekit dora, + recompute_mlp 24/32 +1", FUSED_NOW, "nf4", True, 4, 2048, (24, 1), 15.88, "held out",
     "Issue 16, 2026-12-04 (fourth session), f84e010"),
    ("tunekit qlora, + recompute_mlp 0/32 +31", FUSED_NOW, "nf4", False, 4, 2048, (0, 31), 16.61, "held out",
     "Issue 16, 2026-12-04 (fourth session), c56cc87 (16.60 at 471a0a6 and f80a2fc)"),
    ("plain qlora 16k", PLAIN, "nf4", False, 1, 16384, 32, None, "derived",
     "Long context: OOM asking 32.00 GiB = 32 heads x 16384^2 fp32: SDPA math-kernel scores (attention_scores)"),
]


def estimate_point(path: dict, quant: str, dora: bool, mb: int, seq: int, ckpt: int,
                   dropout: float = 0.0, mlp: int = 0) -> tuple[float, float, bool]:
    """(allocated GiB, plan GiB with context and slack, fits the H200) at ``ckpt`` of 32 checkpointed layers and
    ``mlp`` layers after them recomputing their MLP's gate/up outputs (recompute.py)."""
    kw = dict(micro_batch=mb, max_length=seq, quantization=quant, r=16, use_dora=dora, device_memory_bytes=H200,
              dtype="bf16", **path)  # a path may carry offload_layers (the run's "offload_layers")
    if dropout:
        kw["lora_dropout"] = dropout
    if path is PLAIN and quant == "nf4":
        # the plain loop runs without autocast: prepare_model_for_kbit_training's fp32 stream gives fp32 q/k/v,
        # which with grouped KV heads no fused SDPA kernel takes (flash: 16-bit only; memory-efficient: no GQA)
        kw["attention_scores"] = True
    full = _estimate(LLAMA_8B, gradient_checkpointing=True, **kw)
    none = _estimate(LLAMA_8B, gradient_checkpointing=False, **kw)
    n = LLAMA_8B["num_hidden_layers"]
    more = {}
    if mlp:
        more = dict(mlp=_estimate(LLAMA_8B, gradient_checkpointing=False, recompute_mlp=True, **kw), mlp_layers=mlp)
    alloc = kept_layers_peak(full, none, n, n - ckpt - mlp, allocated=True, **more)
    plan = kept_layers_peak(full, none, n, n - ckpt - mlp, **more)
    return alloc / GiB, plan / GiB, plan <= 0.92 * H200


def rows() -> list[dict]:
    out = []
    for name, path, quant, dora, mb, seq, ckpt, measured, status, source in POINTS:
        ckpt, mlp = ckpt if isinstance(ckpt, tuple) else (ckpt, 0)  # (checkpointed, MLP recomputed)
        row = {"name": name, "tokens": f"{mb}x{seq}", "ckpt": f"{ckpt}/32" + (f" +{mlp} MLP" if mlp else ""),
               "measured": measured, "status": status, "source": source, "estimate": None, "plan": None,
               "error": None, "fits": None}
        if path is not None:
            alloc, plan, fits = estimate_point(path, quant, dora, mb, seq, ckpt, mlp=mlp)
            row.update(estimate=alloc, plan=plan, fits=fits)
            if measured:
                row["error"] = alloc / measured - 1
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true", help="a docs/benchmarks.md table")
    ap.add_argument("--run", nargs=4, metavar=("VARIANT", "MICRO_BATCH", "SEQ", "CHECKPOINTED"),
                    help="the estimate of one run of benchmarks/train_throughput.py (tunekit's side)")
    ap.add_argument("--dropout", type=float, default=0.0, help="with --run: the run's --dropout")
    ap.add_argument("--offload", type=int, default=0, help="with --run: the run's offload_layers")
    ap.add_argument("--mlp", type=int, default=0, help="with --run: the run's mlp_recompute_layers")
    a = ap.parse_args()
    if a.run:
        v, mb, seq, ck = a.run[0], *map(int, a.run[1:])
        path, quant, dora = {"qlora": (FUSED_NOW, "nf4", False), "dora": (FUSED_NOW, "nf4", True),
                             "auto": (FUSED_NOW, "none", False),
                             "speedups_off": ({**SPEEDUPS_OFF, "optimizer_state_bytes": 8}, "nf4", False)}[v]
        alloc, plan, _ = estimate_point({**path, "offload_layers": a.offload}, quant, dora, mb, seq, ck, a.dropout,
                                        a.mlp)
        print(f"{v} {mb}x{seq} {ck}/32 checkpointed, {a.mlp} recomputing the MLP, {a.offload} offloaded, "
              f"dropout {a.dropout}: "
              f"estimate {alloc:.2f} GiB allocated "
              f"(compare with the run's peak), {plan:.2f} GiB with context and slack")
        return
    md = a.markdown

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    if md:
        print("| configuration | tokens | checkpointed | estimate GiB | plan GiB | measured GiB | error | status |")
        print("|---|---|---|---|---|---|---|---|")
    for r in rows():
        measured = "OOM" if r["measured"] is None else f(r["measured"], ".2f")
        err = f(r["error"], "+.1%") if r["error"] is not None else (
            ("refused" if r["fits"] is False else "fits: MISS") if measured == "OOM" else "-")
        cells = [r["name"], r["tokens"], r["ckpt"], f(r["estimate"], ".2f"), f(r["plan"], ".2f"), measured, err,
                 r["status"]]
        print("| " + " | ".join(cells) + " |" if md else
              f"{cells[0]:42} {cells[1]:>8} {cells[2]:>6} {cells[3]:>8} {cells[4]:>8} {cells[5]:>8} {cells[6]:>9}  "
              f"{cells[7]:9} {r['source']}")


if __name__ == "__main__":
    main()
