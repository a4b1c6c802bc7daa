"""Local training across GPUs: tunekit jobs on 1 and N GPUs side by side, through the real launcher.

    python benchmarks/train_multigpu.py [--shape llama-3.1-8b|llama-3.1-70b|tiny] [--layers N] [--seq 2048]
        [--batch 16] [--micro 4] [--rank 16] [--quant nf4|none] [--gpus 1 2] [--layout auto|ddp|fsdp2]
        [--rows 256] [--warmup 2] [--out DIR]

Each entry of --gpus is one `tunekit.finetune(..., backend="local", provider_options={"local": {"gpus": N}})`
job on the same random-weight model (benchmarks/train_throughput.py's build_model: the real config, tunekit's
byte tokenizer, saved once under /tmp; nothing is downloaded) and the same rows of exactly --seq tokens.
Reported per job: the layout the plan chose, tokens/s (the median over the logged steps after --warmup;
the Trainer counts the tokens of every rank), the speed-up over the first entry of --gpus, rank 0's peak
torch.cuda.max_memory_allocated, and the plan's per-GPU estimate with its error against that peak.

The GPU targets (docs/multi-gpu.md): 2 GPUs DDP QLoRA on the 8B shape >= 1.9x one GPU's tokens/s; a 70B-shaped
QLoRA with FSDP2 on 2 GPUs <= 60 GiB per GPU (--shape llama-3.1-70b --quant nf4 --gpus 2 --layout fsdp2; the
bf16 70B model written to disk is ~140 GB: --layers scales it down, which keeps the per-layer arithmetic); the
estimate within 15% of the measured peak. NVLink multicast is off on the lent machines (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, set here unless already set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput as tt  # noqa: E402

tt.SHAPES.setdefault("llama-3.1-70b", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                           num_attention_heads=64, num_key_value_heads=8,
                                           max_position_embeddings=8192, rope_theta=500000.0, vocab_size=128256))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GiB = 2**30


def run_job(a, model: Path, data: Path, gpus: int) -> dict:
    import tunekit
    from tunekit.schemas.job import JobStatus

    local = {"gpus": gpus, "checkpoint_steps": 10**6, "max_steps": a.steps}
    if gpus > 1 and a.layout != "auto":
        local["layout"] = a.layout
    t = time.time()
    job = tunekit.finetune(data, base_model=str(model), backend="local", quantization=a.quant,
                           adapter={"r": a.rank, "alpha": 2 * a.rank, "dropout": 0.0},
                           hyperparameters={"batch_size": a.batch, "gradient_accumulation_steps": a.batch // a.micro,
                                            "max_length": a.seq, "epochs": 1, "learning_rate": 2e-4},
                           provider_options={"local": local}).wait(timeout=a.timeout)
    rows = job.metrics("train")
    speeds = [r["tokens_per_s"] for r in rows if r["step"] > a.warmup and r.get("tokens_per_s")]
    layout = job.record.request.get("layout") or {"kind": "single", "per_gpu_bytes":
                                                   (job.record.request.get("memory_estimate") or {}).get("total_bytes")}
    peak = max((r.get("memory") or 0 for r in rows), default=0)
    est = layout.get("per_gpu_bytes") or 0
    return {"gpus": gpus, "status": job.status.value, "error": job.error, "job": job.id, "layout": layout["kind"],
            "tokens_per_s": statistics.median(speeds) if speeds else None, "peak_gib": peak / GiB,
            "estimate_gib": est / GiB, "estimate_error": (est - peak) / peak if peak and est else None,
            "steps": len(rows), "wall_s": round(time.time() - t, 1),
            "ok": job.status == JobStatus.SUCCEEDED}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(tt.SHAPES), default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="global batch (the same for every --gpus entry)")
    ap.add_argument("--micro", type=int, default=4, help="one-GPU micro-batch (ranks split the global batch)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layout", choices=["auto", "ddp", "fsdp2"], default="auto")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per job")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=None, help="directory for results.jsonl")
    a = ap.parse_args(argv)
    for k, v in NO_MULTICAST.items():
        os.environ.setdefault(k, v)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = a.shape + (f"-{a.layers}l" if a.layers else "")
    model = Path(tempfile.gettempdir()) / f"tunekit-bench-{name}"
    print(json.dumps(tt.build_model({"model": str(model), "shape": a.shape, "layers": a.layers, "device": device})))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    data = Path(tempfile.mkdtemp()) / "train.jsonl"
    rows = tt.make_rows(tok, a.batch * a.steps, [a.seq] * (a.batch * a.steps), seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.environ.setdefault("TUNEKIT_HOME", tempfile.mkdtemp(prefix="tunekit-bench-home-"))

    results = [run_job(a, model, data, g) for g in a.gpus]
    base = results[0]["tokens_per_s"]
    print(f"\n{name} {a.quant} seq {a.seq} global batch {a.batch} r {a.rank} on {device} "
          f"({torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'})")
    print(f"{'gpus':>4} {'layout':>6} {'tokens/s':>10} {'speed-up':>8} {'peak GiB':>9} {'est GiB':>8} {'est err':>8}")
    for r in results:
        sp = r["tokens_per_s"] / base if base and r["tokens_per_s"] else None
        r["speedup"] = sp
        err = f"{r['estimate_error']:+.1%}" if r["estimate_error"] is not None else "-"
        print(f"{r['gpus']:>4} {r['layout']:>6} {r['tokens_per_s'] or 0:>10.0f} {sp or 0:>7.2f}x "
              f"{r['peak_gib']:>9.2f} {r['estimate_gib']:>8.2f} {err:>8}" + ("" if r["ok"] else f"  {r['error']}"))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "a") as f:
            for r in results:
                f.write(json.dumps({**r, "shape": name, "quant": a.quant, "seq": a.seq, "batch": a.batch}) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
