"""Local training throughput: the plain recipe vs tunekit's local path, same shapes and data, in one run.

    python benchmarks/train_throughput.py [--shape llama-3.1-8b|tiny] [--layers N] [--seq 2048 [8192 ...]]
        [--batch 4] [--rank 16] [--variant qlora dora lora_bf16 auto] [--steps 5] [--warmup 2]
        [--qlora-budget-gib 20] [--mixed] [--attribution] [--check-loss [--loss-steps 30]] [--out DIR]

--seq takes several lengths and runs everything at each (a sweep; one table per length), then one sweep table:
tokens/s and peak memory at each length, what the plan chose there (checkpointed layers, activation offload,
tiled MLP) and the longest power-of-two length that trained. A length that fails (out of memory, or refused by
tunekit's fit check with the longest length that fits) is reported and the sweep goes on; longer lengths of
that variant are then skipped (they would fail too). For long context use --batch 1 and
--qlora-budget-gib 0 (the whole device), e.g.
    --seq 8192 16384 32768 65536 131072 262144 --batch 1 --steps 1 --warmup 1 --variant qlora --qlora-budget-gib 0

The model is a random-weight model built from the real config (Llama-3.1-8B: vocab 128256, hidden 4096,
intermediate 14336, 32 layers, 32/8 heads) with tunekit's code-made byte tokenizer, saved once under /tmp and
loaded through from_pretrained: nothing is downloaded; speed and memory do not depend on the weight values.

Plain recipe (the reference script whose H200 figures docs/benchmarks.md gives under "Reference figures"): transformers + PEFT (r, alpha=2r, dropout 0,
all-linear) + bitsandbytes NF4 double quant with bf16 compute, prepare_model_for_kbit_training, non-reentrant
gradient checkpointing, paged 8-bit AdamW, a bare forward/backward/step loop; lora_bf16: bf16 base, fused
AdamW. tunekit: `tunekit.backends.local.train.train()` on a JSONL file of prompt/response rows (a 16-token
prompt and a completion filling --seq tokens exactly), the same token ids the plain loop gets.

Variants (each side in its own subprocess, so no kernel patch or allocator state leaks between them):
  qlora      plain QLoRA            vs tunekit quantization="nf4" with memory_budget_bytes=--qlora-budget-gib
  dora       plain QLoRA + DoRA     vs tunekit nf4 + use_dora (same budget); also vs tunekit's own qlora
  lora_bf16  plain bf16 LoRA        vs tunekit quantization="none"
  auto       plain QLoRA            vs tunekit quantization="auto" (bf16 when it fits the device)
--mixed: rows of mixed lengths like the bundled data (log-uniform from 64 to min(2048, --seq) tokens; --seq is
max_length) instead of rows filling --seq; the plain recipe pads each batch to its longest row, tunekit runs
unpacked (packing=false, padded as plain) and packed (packing=true: rows packed into --seq-token sequences,
each row attending only to itself). Tokens/s counts the rows' tokens only (no padding) on both sides.
Tokens/s is the median over --steps timed steps after --warmup; peak memory is torch.cuda.max_memory_allocated
over the training steps. --attribution adds tunekit runs with provider_options.local.speedups="off" (the TRL path
alone).

--check-loss trains both sides for --loss-steps full-batch steps on one fixed batch of --batch rows of varied
lengths (padding included), same seed, constant LR, and compares the loss curves against the plain recipe's
own seed-to-seed spread (plain at --seed vs plain at --seed+1). There auto is compared with the plain recipe
of the precision it resolved to (bf16 LoRA or QLoRA): a different base learns a different curve.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),
}
PROMPT_TOKENS = 16
GiB = 2**30


# ------------------------------------------------------------------------------------------------ model + data

def build_model(p: dict) -> dict:
    """Save the random-weight model + tokenizer once (idempotent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunekit.testing import build_tokenizer

    path = Path(p["model"])
    if (path / "config.json").exists() and (path / "tokenizer_config.json").exists():
        return {"built": False}
    t = time.time()
    tok = build_tokenizer()
    shape = dict(SHAPES[p["shape"]])
    shape.setdefault("vocab_size", len(tok))
    if p.get("layers"):
        shape["num_hidden_layers"] = p["layers"]
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    cuda = p["device"] == "cuda"
    if cuda:
        torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"built": True, "seconds": round(time.time() - t, 1)}


def check_rows(tok, batch: int, seq: int, seed: int) -> list[dict]:
    """The one fixed batch of --check-loss: one row of --seq tokens, the others of varied lengths (padding)."""
    rng = random.Random(seed)
    lengths = [seq] + [rng.randint(max(PROMPT_TOKENS + 4, seq // 2), seq) for _ in range(batch - 1)]
    return make_rows(tok, batch, lengths, seed)


def make_rows(tok, n: int, lengths: list[int], seed: int) -> list[dict]:
    """prompt/response rows whose TRL tokenization (prompt + completion + EOS) has exactly the given lengths."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    rows = []
    for i in range(n):
        prompt = "Q: " + "".join(rng.choice(alphabet) for _ in range(PROMPT_TOKENS - 3))
        completion = " " + "".join(rng.choice(alphabet) for _ in range(lengths[i] - PROMPT_TOKENS - 2))
        got = len(tok(prompt + completion + tok.eos_token)["input_ids"])
        assert got == lengths[i], (got, lengths[i])  # the byte tokenizer: one token per ASCII character
        rows.append({"prompt": prompt, "response": completion})
    return rows


def mixed_lengths(n: int, seq: int, seed: int) -> list[int]:
    """--mixed: row lengths log-uniform in [64, min(2048, seq)], like the bundled data (short rows dominate)."""
    rng = random.Random(seed)
    hi = min(2048, seq)
    return [min(hi, int(64 * (hi / 64) ** rng.random())) for _ in range(n)]


def encode(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) the way TRL builds them: prompt tokens masked, EOS appended to the completion."""
    out = []
    for r in rows:
        ids = tok(r["prompt"] + r["response"] + tok.eos_token)["input_ids"]
        n_prompt = len(tok(r["prompt"])["input_ids"])
        out.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


# ------------------------------------------------------------------------------------------------ plain recipe

def plain_run(p: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

    cuda = p["device"] == "cuda"
    dev = torch.device("cuda:0" if cuda else "cpu")
    quant = p["variant"] in ("qlora", "dora", "auto")
    kw: dict = {}
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if cuda:
        kw["device_map"] = {"": 0}
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.bfloat16 if cuda else torch.float32, **kw)
    load_s = time.time() - t
    ckpt = cuda  # the anchor recipe checkpoints on the GPU; on CPU it changes nothing but time
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    set_seed(p["seed"])  # as train() does, right before the adapter is created
    model = get_peft_model(model, LoraConfig(r=p["rank"], lora_alpha=2 * p["rank"], lora_dropout=0.0,
                                             target_modules="all-linear", use_dora=p["variant"] == "dora",
                                             task_type="CAUSAL_LM"))
    params = [q for q in model.parameters() if q.requires_grad]
    if quant:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=p["lr"], weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0, fused=cuda)
    model.train()
    tok = AutoTokenizer.from_pretrained(p["model"])
    data = encode(tok, json_rows(p["data"]))
    B = p["batch"]
    if p["check"]:
        batches = [collate(data, tok.pad_token_id)] * p["loss_steps"]
    else:
        n = min(len(data) // B, p["warmup"] + p["steps"])  # --mixed writes more rows than the plain loop needs
        batches = [collate(data[i * B:(i + 1) * B], tok.pad_token_id) for i in range(n)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times, tokens, norms = [], [], [], []
    for ids, mask, labels in batches:
        ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        if p["check"]:  # train() clips at the spec's max_grad_norm (1.0)
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(out.loss.item()))
        tokens.append(int(mask.sum()))
    res = {"load_s": round(load_s, 1), "losses": losses, "grad_norms": norms, "step_times": times,
           "step_tokens": tokens, "trainable_params": sum(q.numel() for q in params)}
    if cuda:
        res["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return res


def collate(data, pad_id):
    import torch

    n = max(len(ids) for ids, _ in data)
    ids = torch.full((len(data), n), pad_id, dtype=torch.long)
    labels = torch.full((len(data), n), -100, dtype=torch.long)
    mask = torch.zeros((len(data), n), dtype=torch.long)
    for i, (a, lab) in enumerate(data):
        ids[i, :len(a)], labels[i, :len(a)], mask[i, :len(a)] = torch.tensor(a), torch.tensor(lab), 1
    return ids, mask, labels


def json_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------ tunekit

def tunekit_run(p: dict) -> dict:
    from tunekit.backends.local.run import run_for_files
    from tunekit.backends.local.train import TrainCallbacks, train
    from tunekit.schemas.spec import TrainingSpec

    if not p.get("dora_kernels", True):  # --dora-ab
        from tunekit.backends.local import dora_triton

        dora_triton.TUNING["enabled"] = False
    if not p.get("nf4_kernel", True):  # --nf4-ab
        from tunekit.backends.local import nf4_triton

        nf4_triton.TUNING["enabled"] = False
    quant = {"qlora": "nf4", "dora": "nf4", "lora_bf16": "none", "auto": "auto"}[p["variant"]]
    B = p["batch"]
    steps = p["loss_steps"] if p["check"] else p["warmup"] + p["steps"]
    spec = TrainingSpec(
        base_model=p["model"], quantization=quant,
        hyperparameters={"batch_size": B, "max_length": p["seq"], "learning_rate": p["lr"], "warmup_ratio": 0.0,
                         "lr_scheduler": "constant", "epochs": steps if p["check"] else 1, "seed": p["seed"]},
        adapter={"r": p["rank"], "alpha": 2 * p["rank"], "dropout": p.get("dropout", 0.0),
                 "target_modules": "all-linear",
                 "use_dora": p["variant"] == "dora"},
    )

    class Rec(TrainCallbacks):
        def __init__(self):
            self.marks, self.losses, self.norms, self.lrs, self.events = [], [], [], [], []

        def on_start(self, total_steps):
            self.marks.append((time.perf_counter(), 0))

        def on_step(self, step, m):
            self.marks.append((time.perf_counter(), m.get("tokens", 0)))
            self.losses.append(m.get("loss"))
            self.norms.append(m.get("grad_norm"))
            self.lrs.append(m.get("lr"))
            if p.get("profile") and step == p["warmup"]:  # profile the first timed step
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
            elif getattr(self, "prof", None) is not None:
                self.prof.__exit__(None, None, None)
                ka = self.prof.key_averages()
                busy = sum(e.self_device_time_total for e in ka) / 1e6
                print(f"[profile {p['variant']}] GPU busy {busy:.3f} s in one step\n"
                      + ka.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70), file=sys.stderr, flush=True)
                self.prof = None

        def on_event(self, level, message):
            self.events.append(message)
            print(f"[tunekit {level}] {message}", file=sys.stderr, flush=True)

    rec = Rec()
    budget = p.get("budget_gib")
    # checkpoint_steps past the last step: a job checkpoints about 10 times per run, which in a run this short
    # would be a save after every timed step (the adapter and the optimizer state to disk), not training speed
    run = run_for_files(spec, p["data"], tempfile.mkdtemp(prefix="tk-bench-"), max_steps=steps, device=p["device"],
                        logging_steps=1, checkpoint_steps=steps + 1, memory_budget_gb=float(budget) if budget else None,
                        speedups=p.get("speedups", "auto"), packing=p.get("packing", False))
    out = train(run, rec)
    # logging_first_step adds a log at step 1; marks[0] is the start, so marks[i] ends step i
    times = [b[0] - a[0] for a, b in zip(rec.marks, rec.marks[1:])]
    tokens = [b[1] - a[1] for a, b in zip(rec.marks, rec.marks[1:])]
    res = {"losses": rec.losses, "grad_norms": rec.norms, "learning_rates": rec.lrs, "step_times": times,
           "step_tokens": tokens, "events": rec.events,
           "quantization": out.quantization, "speed": out.extra.get("speed"),
           "memory_estimate_bytes": out.memory_estimate.get("total_bytes"), "optimizer": out.optimizer,
           "gradient_checkpointing": out.gradient_checkpointing, "packing": out.extra.get("packing")}
    if p["device"] == "cuda":
        import torch

        res["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return res


# ------------------------------------------------------------------------------------------------ driver

def speedups_off(opt: str) -> str | list[str]:
    """--ablate's OPT ('all', 'a' or 'a,b') as provider_options.local.speedups."""
    return "off" if opt == "all" else ["-" + o for o in opt.split(",")]


def child(job: str, p: dict) -> dict:
    """Run one job in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--_job", job, "--_params", json.dumps(p)]
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), e.get("PYTHONPATH", "")) if x)
    t = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=e)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:  # killed (e.g. host memory) before it could say why
        return {"error": f"exit {r.returncode}", "stdout_tail": r.stdout[-2000:], "wall_s": round(time.time() - t, 1)}
    res = json.loads(lines[-1][7:])
    res["wall_s"] = round(time.time() - t, 1)
    return res


def failure(exc: BaseException) -> str:
    """One line: OOM (CUDA out of memory), refused (tunekit's fit check) or the exception."""
    name = type(exc).__name__
    msg = str(exc).splitlines()[0][:300] if str(exc) else ""
    if name == "OutOfMemoryError" or "out of memory" in msg.lower():
        return f"OOM: {msg}"
    if name == "ResourceError":
        return f"refused: {msg}"
    return f"{name}: {msg}"


def summarize(res: dict, warmup: int) -> dict:
    if "error" in res:
        return {"error": res["error"], **({"hint": res["hint"]} if res.get("hint") else {})}
    times, toks = res["step_times"][warmup:], res["step_tokens"][warmup:]
    if not times:
        return {"error": "no timed steps"}
    med = statistics.median(times)
    tok = statistics.median(toks)
    out = {"tokens_per_s": round(tok / med, 1), "median_step_s": round(med, 4), "step_tokens": tok,
           "steps_timed": len(times), "peak_gib": round(res["peak_bytes"] / GiB, 2) if "peak_bytes" in res else None}
    if res.get("memory_estimate_bytes"):
        out["fit_check_estimate_gib"] = round(res["memory_estimate_bytes"] / GiB, 2)
    sp = res.get("speed") or {}
    if sp:
        out["speedups"] = [k for k, v in sp["enabled"].items() if v]
        # what kernels.apply and the run's start did: flags (varlen attention for packed rows, cuDNN's SDPA off for
        # varying lengths) and counts (patched modules, fused MLPs, layers recomputing their norms)
        out["applied"] = {k: v for k, v in sorted((sp.get("applied") or {}).items())
                          if v is True or (type(v) is int and v > 0)}
        if (sp.get("applied") or {}).get("dora_kernels"):
            out["dora_kernels"] = sp["applied"]["dora_kernels"]  # "triton" or "torch" (dora_triton.py)
        out["checkpointed_layers"] = f'{sp["checkpointed_layers"]}/{sp["num_layers"]}'
        out["mlp_recompute_layers"] = sp.get("mlp_recompute_layers", 0)  # after the checkpointed ones
        out["offload_layers"] = sp.get("offload_layers", 0)
        out["mlp_tile_tokens"] = sp.get("mlp_tile_tokens", 0)
        if sp.get("host_bytes"):
            out["host_gib"] = round(sp["host_bytes"] / GiB, 2)
        if sp.get("memory_estimate_bytes"):
            out["plan_estimate_gib"] = round(sp["memory_estimate_bytes"] / GiB, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--seq", type=int, nargs="+", default=None,
                    help="tokens per example, or max_length with --mixed; several: a sweep (default 2048; tiny: 128)")
    ap.add_argument("--mixed", action="store_true",
                    help="rows of 64..2048 tokens; tunekit unpacked and packed (see above)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="tunekit's LoRA dropout (the plain recipe keeps 0); for the memory estimate's dropout term")
    ap.add_argument("--variant", nargs="+", default=["qlora", "dora", "lora_bf16", "auto"],
                    choices=["qlora", "dora", "lora_bf16", "auto"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--qlora-budget-gib", type=float, default=20.0,
                    help="tunekit memory_budget_bytes for qlora/dora (0: the device's memory)")
    ap.add_argument("--attribution", nargs="*", default=None, metavar="VARIANT",
                    help="also run tunekit with speedups='off' for these variants (none named: all)")
    ap.add_argument("--ablate", nargs="*", default=[], metavar="OPT",
                    help="also run tunekit qlora/dora with each named speed-up off (speedups=['-OPT']; 'a,b' for "
                         "several, 'all' for none); with --check-loss, for every variant")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain recipe (tunekit only)")
    ap.add_argument("--dora-ab", action="store_true",
                    help="dora: also run tunekit with dora_triton's kernel off (the torch expression), an A/B")
    ap.add_argument("--nf4-ab", action="store_true",
                    help="qlora/dora: also run tunekit with nf4_triton's kernel off (torch.cat), an A/B")
    ap.add_argument("--check-loss", action="store_true")
    ap.add_argument("--loss-steps", type=int, default=30)
    ap.add_argument("--no-noise", action="store_true", help="--check-loss without the plain seed+1 run")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler kernel table of one timed step")
    ap.add_argument("--out", default=None, help="directory for results.jsonl")
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    ap.add_argument("--_params", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._job:
        p = json.loads(a._params)
        fn = {"build": build_model, "plain": plain_run, "tunekit": tunekit_run}[a._job]
        try:
            res = fn(p)
        except Exception as exc:  # an OOM or a refused plan is a result of the sweep, not the end of it
            import traceback

            traceback.print_exc()
            res = {"error": failure(exc), "hint": getattr(exc, "hint", None)}
        print("RESULT " + json.dumps(res), flush=True)
        return 1 if "error" in res else 0

    import torch
    from transformers import AutoTokenizer

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqs = a.seq or [2048 if a.shape != "tiny" else 128]
    layers = a.layers
    model_dir = f"/tmp/tunekit-bench/{a.shape}" + (f"-L{layers}" if layers else "") + f"-{device}"
    base = {"model": model_dir, "shape": a.shape, "layers": layers, "device": device, "seq": seqs[0],
            "batch": a.batch, "rank": a.rank, "dropout": a.dropout, "lr": a.lr, "seed": a.seed, "steps": a.steps,
            "warmup": a.warmup,
            "loss_steps": a.loss_steps, "check": a.check_loss, "profile": a.profile}
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
            "argv": " ".join(sys.argv), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "versions": versions()}
    print(json.dumps(meta), flush=True)
    built = child("build", base)
    print(json.dumps({"build": built}), flush=True)
    if "error" in built:
        return 1

    tok = AutoTokenizer.from_pretrained(model_dir)
    rc = 0
    swept: list[dict] = []
    for seq in seqs:
        if len(seqs) > 1:
            print(json.dumps({"seq": seq}), flush=True)
        rc |= run_length(a, {**base, "seq": seq}, tok, meta, device, swept)
    if len(seqs) > 1 and not a.check_loss:
        sweep_table(swept, meta)
    return rc


def sweep_table(results: list[dict], meta: dict) -> None:
    """Tokens/s and peak at each length per variant and side, and the longest power-of-two length that trained."""
    print(f"\nsweep {meta['date']} commit {meta['commit']} on {meta['gpu'] or meta['device']}")
    print(f"{'variant':10} {'impl':22} {'seq':>8} {'tok/s':>8} {'peak GiB':>9} {'est GiB':>8} {'ckpt':>6} "
          f"{'offload':>7} {'tile':>5}  status")
    longest: dict[tuple, int] = {}
    for r in results:
        key = (r["variant"], r["impl"])
        if "error" in r:
            status = r["error"] + (f" (hint: {r['hint']})" if r.get("hint") else "")
            print(f"{r['variant']:10} {r['impl']:22} {r['seq']:>8} {'-':>8} {'-':>9} {'-':>8} {'':>6} {'':>7} "
                  f"{'':>5}  {status[:160]}")
            continue
        if r["seq"] & (r["seq"] - 1) == 0:
            longest[key] = max(longest.get(key, 0), r["seq"])
        est = r.get("fit_check_estimate_gib")
        print(f"{r['variant']:10} {r['impl']:22} {r['seq']:>8} {r['tokens_per_s']:8.0f} "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '-':>9} {est if est else '-':>8} "
              f"{r.get('checkpointed_layers') or '-':>6} {r.get('offload_layers', '-'):>7} "
              f"{r.get('mlp_tile_tokens', '-'):>5}  ok")
    for (v, impl), n in sorted(longest.items()):
        print(json.dumps({"variant": v, "impl": impl, "longest_power_of_two_trained": n}))


def run_length(a, base: dict, tok, meta: dict, device: str, swept: list | None = None) -> int:
    """Every variant at one --seq length (one table). ``swept`` collects the records of a sweep: a side that
    failed at a shorter length is not run again (it would fail longer too)."""
    swept = swept if swept is not None else []
    failed = {(r["variant"], r["impl"]) for r in swept if "error" in r}
    seq, n = base["seq"], a.batch * (a.warmup + a.steps)
    data = Path(tempfile.mkdtemp(prefix="tk-bench-data-")) / "train.jsonl"
    if a.check_loss:
        rows = check_rows(tok, a.batch, seq, a.seed)
    elif a.mixed:  # enough rows for the packed run's steps too (each packed sequence holds several rows)
        lengths = mixed_lengths(n, seq, a.seed)
        per_row = sum(lengths) / len(lengths)
        lengths = mixed_lengths(int(n * (seq / per_row) * 1.5) + n, seq, a.seed)
        rows = make_rows(tok, len(lengths), lengths, a.seed)
    else:
        rows = make_rows(tok, n, [seq] * n, a.seed)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base["data"] = str(data)

    results = []

    def record(variant: str, impl: str, res: dict, extra: dict | None = None) -> dict:
        rec = {"variant": variant, "impl": impl, "seq": seq, **(extra or {})}
        if a.check_loss:
            rec["losses"] = res.get("losses")
            rec.update({k: res[k] for k in ("grad_norms", "learning_rates") if k in res})
            if "error" in res:
                rec["error"] = res["error"]
        else:
            rec.update(summarize(res, a.warmup))
        if "error" in res:
            rec["stdout_tail"] = res.get("stdout_tail", "")[-800:]
        rec["wall_s"] = res.get("wall_s")
        results.append(rec)
        swept.append(rec)
        print(json.dumps(rec), flush=True)
        return rec

    def run(job: str, variant: str, impl: str, params: dict, extra: dict | None = None) -> dict:
        if (variant, impl) in failed:  # failed at a shorter length of this sweep
            rec = {"variant": variant, "impl": impl, "seq": seq, **(extra or {}),
                   "error": "skipped: failed at a shorter length"}
            results.append(rec)
            swept.append(rec)
            print(json.dumps(rec), flush=True)
            return rec
        return record(variant, impl, child(job, params), extra)

    if a.check_loss:
        return check_loss(a, base, record, meta, device)

    plain_cache: dict[str, dict] = {}
    for v in a.variant:
        plain_variant = "qlora" if v == "auto" else v
        if not a.no_plain and plain_variant not in plain_cache:
            plain_cache[plain_variant] = run("plain", plain_variant, "plain", {**base, "variant": plain_variant},
                                             {"seq": seq, "mixed": a.mixed})
        budget = a.qlora_budget_gib if (v in ("qlora", "dora") and a.qlora_budget_gib and device == "cuda") else None
        p = {**base, "variant": v, "budget_gib": budget}
        tk = run("tunekit", v, "tunekit", p, {"budget_gib": budget, "seq": seq, "mixed": a.mixed})
        if a.mixed:
            packed = record(v, "tunekit_packed", child("tunekit", {**p, "packing": True}),
                            {"budget_gib": budget, "seq": seq, "mixed": True})
            if packed.get("tokens_per_s") and tk.get("tokens_per_s"):
                packed["ratio_vs_unpacked"] = round(packed["tokens_per_s"] / tk["tokens_per_s"], 3)
        if a.attribution is not None and (not a.attribution or v in a.attribution):
            record(v, "tunekit_speedups_off", child("tunekit", {**p, "speedups": "off"}), {"budget_gib": budget})
        if v == "dora" and a.dora_ab:
            record(v, "tunekit_dora_kernels_off", child("tunekit", {**p, "dora_kernels": False}),
                   {"budget_gib": budget, "seq": seq})
        if v in ("qlora", "dora") and a.nf4_ab:
            record(v, "tunekit_nf4_kernel_off", child("tunekit", {**p, "nf4_kernel": False}),
                   {"budget_gib": budget, "seq": seq})
        if v in ("qlora", "dora"):
            for opt in a.ablate:
                record(v, f"tunekit_without_{opt}", child("tunekit", {**p, "speedups": speedups_off(opt)}),
                       {"budget_gib": budget})
        ref = plain_cache.get(plain_variant)
        if ref and tk.get("tokens_per_s") and ref.get("tokens_per_s"):
            tk["ratio_vs_plain_" + plain_variant] = round(tk["tokens_per_s"] / ref["tokens_per_s"], 3)
    table(results, plain_cache, meta)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        with open(Path(a.out) / "results.jsonl", "a") as f:
            for r in [meta] + results:
                f.write(json.dumps(r) + "\n")
    return 0


def table(results: list[dict], plain: dict, meta: dict) -> None:
    q = (plain.get("qlora") or {}).get("tokens_per_s")
    tk_q = next((r.get("tokens_per_s") for r in results if r["variant"] == "qlora" and r["impl"] == "tunekit"), None)
    seq = next((r["seq"] for r in results if r.get("seq")), None)
    print(f"\n{meta['date']} commit {meta['commit']} on {meta['gpu'] or meta['device']}, seq {seq}"
          + (" (--mixed: rows of 64..2048 tokens)" if any(r.get("mixed") for r in results) else ""))
    print(f"{'variant':10} {'impl':30} {'tok/s':>9} {'peak GiB':>9} {'x plain':>8} {'x plain qlora':>13}  notes")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:10} {r['impl']:30} ERROR {r['error']}")
            continue
        ref = (plain.get("qlora" if r["variant"] == "auto" else r["variant"]) or {}).get("tokens_per_s")
        tps = r["tokens_per_s"]
        notes = []
        if r["impl"] != "plain":
            notes.append(f"ckpt {r.get('checkpointed_layers')}"
                         + (f", MLP recomputed {r['mlp_recompute_layers']}" if r.get("mlp_recompute_layers") else ""))
            if r["variant"] == "dora" and tk_q and r["impl"] == "tunekit":
                notes.append(f"{100 * (1 - tps / tk_q):+.1f}% slower than tunekit qlora")
        print(f"{r['variant']:10} {r['impl']:30} {tps:9.0f} {r['peak_gib'] if r['peak_gib'] is not None else '-':>9} "
              f"{(tps / ref if ref else float('nan')):8.2f} {(tps / q if q else float('nan')):13.2f}  {'; '.join(notes)}")


def check_loss(a, base: dict, record, meta: dict, device: str) -> int:
    ok = True
    for v in a.variant:
        # the same budget as the throughput runs: a small one makes the plan recompute (checkpointing, recompute_mlp)
        budget = a.qlora_budget_gib if (v in ("qlora", "dora") and a.qlora_budget_gib and device == "cuda") else None
        tk_res = child("tunekit", {**base, "variant": v, "budget_gib": budget})
        # auto learns on the base it resolved to: compare it with the plain recipe of that precision
        mode = (tk_res.get("quantization") or {}).get("mode")
        pv = v if v != "auto" else ("qlora" if mode in ("nf4", "fp4", None) else "lora_bf16")
        plain = record(pv, "plain", child("plain", {**base, "variant": pv}))
        noise = (None if a.no_noise else
                 record(pv, "plain_seed+1", child("plain", {**base, "variant": pv, "seed": a.seed + 1})))
        tk = record(v, "tunekit", tk_res, {"quantization": mode} if v == "auto" else None)
        if any("error" in r for r in (plain, noise or {}, tk)):
            ok = False
            continue
        if noise is None:
            noise = {"losses": [float("nan")] * len(plain["losses"])}
        n = min(len(plain["losses"]), len(tk["losses"]), len(noise["losses"]))
        d_tk = max(abs(x - y) for x, y in zip(tk["losses"][:n], plain["losses"][:n]))
        d_seed = max(abs(x - y) for x, y in zip(noise["losses"][:n], plain["losses"][:n]))
        match = d_tk <= max(d_seed, 1e-4) if not a.no_noise else None
        ok &= match is not False
        print(json.dumps({"variant": v, "steps": n, "max_abs_diff_tunekit_vs_plain": round(d_tk, 5),
                          "max_abs_diff_plain_seed_vs_seed+1": round(d_seed, 5), "match": match,
                          "plain_first_last": [round(plain["losses"][0], 4), round(plain["losses"][n - 1], 4)],
                          "tunekit_first_last": [round(tk["losses"][0], 4), round(tk["losses"][n - 1], 4)]}), flush=True)
        extra = {}
        for opt in a.ablate:  # attribution: the same check with speed-ups switched off ("all" = every one)
            without = {**base, "variant": v, "speedups": speedups_off(opt)}
            r = record(v, f"tunekit_without_{opt}", child("tunekit", without))
            if "error" not in r:
                extra[opt] = r["losses"]
                print(json.dumps({"variant": v, "without": opt, "max_abs_diff_vs_plain": round(max(
                    abs(x - y) for x, y in zip(r["losses"][:n], plain["losses"][:n])), 5)}), flush=True)
        for i in range(n):
            print(f"  {v:9} step {i + 1:3}  plain {plain['losses'][i]:.4f}  tunekit {tk['losses'][i]:.4f}  "
                  f"plain(seed+1) {noise['losses'][i]:.4f}" + _norms(i, plain, tk)
                  + "".join(f"  without {k} {ls[i]:.4f}" for k, ls in extra.items() if i < len(ls)))
    print(f"{meta['date']} commit {meta['commit']}: loss curves {'MATCH' if ok else 'DIFFER'}", flush=True)
    return 0 if ok else 1


def _norms(i: int, plain: dict, tk: dict) -> str:
    """Gradient norms before clipping (and tunekit's learning rate) of step i, where recorded."""
    def at(r, k):
        v = r.get(k) or []
        return v[i] if i < len(v) and v[i] is not None else float("nan")

    return (f"  |g| plain {at(plain, 'grad_norms'):.3g} tunekit {at(tk, 'grad_norms'):.3g}"
            f"  lr {at(tk, 'learning_rates'):.3g}")


def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # the device machine gets the working tree without .git
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for n in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger_kernel", "accelerate"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
