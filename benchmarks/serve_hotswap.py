"""Embedded server: LoRA hot-swap time and multi-adapter throughput.

Builds a random-weight Llama-3.1-8B-shaped model (or a tiny one with --tiny), saves it and 16 random
r=16 all-linear adapters under --work, then measures and prints one JSON line per figure:

  (a) swap_ms            copying a host-cached r=16 adapter into a resident LoRA slot (median; target <= 10 ms)
      acquire_ms         the pool's full swap path for a non-resident adapter (LRU bookkeeping + copy)
      peft_load_adapter_ms  PEFT's load_adapter of the same adapter from disk onto the resident base (baseline)
  (b) tokens_per_s for 16 requests in flight on the base alone, and for 16 requests each with a distinct
      adapter (through the HTTP server, greedy, EOS disabled so every request generates --max-tokens);
      throughput_ratio = adapters / base (target >= 0.85; base target >= 1,500 tokens/s: issue 15, 8B shape on
      an H200; --tiny runs print no targets), as the ratio of the medians of --repeats runs
      (after one untimed warm-up run of each; base and adapter runs alternate) and as the median of the
      paired runs' ratios.

The 16 requests are lined up before the scheduler takes them (engine.paused()), so both runs decode
one 16-row batch: the figure is batched-decode throughput, not arrival jitter.

With --dora the adapters are DoRA (magnitudes moved off their initial value), served unmerged: the
same figures give DoRA's hot-swap time and its 16-adapter throughput against the base.

    python benchmarks/serve_hotswap.py --tiny                  # CPU smoke test
    python3 benchmarks/serve_hotswap.py --work /tmp/tk-bench   # GPU, 8B shape
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def llama8b_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=5,
                       pad_token_id=0)


def big_vocab_tokenizer(vocab: int):
    """The tiny byte tokenizer padded to ``vocab`` ids with ASCII filler tokens, so any sampled id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tunekit.testing import CHAT_TEMPLATE, SPECIAL_TOKENS

    table = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        table[ch] = len(table)
    i = 0
    while len(table) < vocab:
        table[f"w{i}"] = len(table)
        i += 1
    tok = Tokenizer(models.BPE(vocab=table, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|start|>", "</s>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base(work: Path, tiny: bool) -> Path:
    import torch

    path = work / ("tiny-llama" if tiny else "llama8b-random")
    if (path / "config.json").exists():
        return path
    t = time.time()
    if tiny:
        from tunekit.testing import build_tiny_llama

        build_tiny_llama(path, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4)
    else:
        from transformers import LlamaForCausalLM

        vocab = 128256
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama8b_config(vocab)).to(torch.bfloat16)
        model.save_pretrained(path)
        big_vocab_tokenizer(vocab).save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    emit({"step": "build_base", "path": str(path), "seconds": round(time.time() - t, 1)})
    return path


def build_adapters(base: Path, work: Path, n: int, rank: int, device: str, dora: bool = False) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = [work / f"{'dora' if dora else 'adapter'}-r{rank}-{i:02d}" for i in range(n)]
    if all((d / "adapter_config.json").exists() for d in dirs):
        return dirs
    t = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **({"device_map": {"": 0}} if device == "cuda"
                                                                       else {}))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  task_type="CAUSAL_LM", use_dora=dora))
    gen = torch.Generator(device="cpu")
    for i, d in enumerate(dirs):
        gen.manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:  # off its initial ||W||: the gains are not all 1
                    p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen).to(p))
                elif "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * (0.02 if "lora_B" in name else 0.05))
        peft_model.save_pretrained(d)
    del peft_model, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    emit({"step": "build_adapters", "count": n, "rank": rank, "dora": dora, "seconds": round(time.time() - t, 1)})
    return dirs


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peft_load_adapter_ms(base: Path, adapters: list[Path], device: str, repeats: int) -> list[float]:
    """Baseline: PEFT load_adapter from disk onto a resident base (what a naive server does per swap)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **({"device_map": {"": 0}} if device == "cuda"
                                                                       else {}))
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="warm")
    times = []
    for i in range(repeats):
        src = adapters[1 + i % (len(adapters) - 1)]
        sync(device)
        t = time.perf_counter()
        peft_model.load_adapter(src, adapter_name=f"a{i}")
        peft_model.set_adapter(f"a{i}")
        sync(device)
        times.append((time.perf_counter() - t) * 1000)
        peft_model.set_adapter("warm")
        peft_model.delete_adapter(f"a{i}")
    del peft_model, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return times


def swap_figures(engine, names: list[str], device: str, repeats: int) -> tuple[list[float], list[float]]:
    pool = engine.pool
    pool.acquire([names[0]])  # apply the slot layout once
    copy_ms, acquire_ms = [], []
    for i in range(repeats):
        name = names[i % len(names)]
        packed = pool._packed[name][1]  # host-cached, packed for the current layout
        sync(device)
        t = time.perf_counter()
        pool.slots.write(1, packed)
        sync(device)
        copy_ms.append((time.perf_counter() - t) * 1000)
    for name in names:  # slot 1 was overwritten above: forget every residency so no slot is stale
        pool.evict(name)
    # full path: acquire an adapter that is registered and host-cached but not in a slot
    for i in range(repeats):
        name = names[i % len(names)]
        pool.evict(name)
        sync(device)
        t = time.perf_counter()
        pool.acquire([name])
        sync(device)
        acquire_ms.append((time.perf_counter() - t) * 1000)
    return copy_ms, acquire_ms


def timed_run(server, model_names: list[str], prompt: str, max_tokens: int) -> tuple[float, dict]:
    """One batch of len(model_names) requests lined up together: (completion tokens per second, its batch)."""
    import httpx

    engine = server.engine
    results: list[dict] = []
    lock = threading.Lock()

    def call(model: str) -> None:
        r = httpx.post(server.url + "/v1/completions", timeout=600,
                       json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        with lock:
            results.append(r.json())

    threads = [threading.Thread(target=call, args=(m,)) for m in model_names]
    with engine.paused():
        for t in threads:
            t.start()
        while engine.pending() < len(model_names):
            time.sleep(0.001)
        t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return tokens / wall, engine.stats()["recent_batches"][-1]


def throughput(server, kinds: dict[str, list[str]], prompt: str, max_tokens: int, repeats: int) -> dict[str, dict]:
    """Tokens/s per kind of batch (e.g. base vs distinct adapters): one untimed warm-up run of each kind
    (the first runs pay allocator growth and lazy initialisation), then ``repeats`` rounds alternating the
    kinds, so drift (clocks, other load) hits every kind alike. Reports the median and every run."""
    warmup = {kind: timed_run(server, names, prompt, max_tokens)[0] for kind, names in kinds.items()}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    batches: dict[str, dict] = {}
    for _ in range(repeats):
        for kind, names in kinds.items():
            rate, batches[kind] = timed_run(server, names, prompt, max_tokens)
            rates[kind].append(rate)
    return {kind: {"tokens_per_s": round(statistics.median(rates[kind]), 1),
                   "runs": [round(r, 1) for r in rates[kind]], "warmup_run": round(warmup[kind], 1),
                   "requests": len(names), "max_tokens": max_tokens, "last_batch_size": batches[kind]["size"],
                   "distinct_models_in_batch": len(batches[kind]["models"])}
            for kind, names in kinds.items()}


def step_phases(server, kinds: dict[str, list[str]], prompt: str, max_tokens: int) -> dict[str, dict]:
    """Where a decode step's time goes, per kind of batch (one more run of each, timed by phase), in ms per step:
    step (the scheduler's whole step), forward (host time to launch the forward: the graph replay or the eager
    forward), gpu_forward (the forward's GPU time, CUDA events around the replay; graphs only), sample (argmax and
    the copy to the host: waits for the GPU), rows (per-row work: detokenize, stop checks, hand-off to the HTTP
    side), and the wall per step of the whole run (steps = decode forwards, prefill excluded)."""
    import collections

    import torch

    from tunekit.serve.embedded import static

    engine = server.engine
    acc: dict[str, float] = collections.defaultdict(float)
    events: list = []
    cuda = engine.device.type == "cuda"

    span: list[float] = []  # start of the first step, end of the last

    def timed(key: str, f):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            if key == "step" and not span:
                span.append(t)
            try:
                return f(*a, **kw)
            finally:
                acc[key] += time.perf_counter() - t
                if key == "step":
                    span[1:] = [time.perf_counter()]
        return wrapper

    real_forward, real_replay = static.StaticRunning.forward, static.StaticRunning._replay

    def replay(self, cache_kw):
        if not cuda:
            return real_replay(self, cache_kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real_replay(self, cache_kw)
        end.record()
        events.append((start, end))
        return out

    out = {}
    engine._step, engine._sample, engine._advance = (timed("step", engine._step), timed("sample", engine._sample),
                                                     timed("rows", engine._advance))
    static.StaticRunning.forward, static.StaticRunning._replay = timed("forward", real_forward), replay
    try:
        for kind, names in kinds.items():
            acc.clear()
            events.clear()
            span.clear()
            before = engine.stats().get("forward_passes", 0)
            rate, _ = timed_run(server, names, prompt, max_tokens)
            steps = engine.stats().get("forward_passes", 0) - before - 1  # minus the prefill
            if cuda:
                torch.cuda.synchronize()
            gpu = sum(s.elapsed_time(e) for s, e in events) / len(events) if events else None
            wall = max_tokens * len(names) / rate
            out[kind] = {"tokens_per_s": round(rate, 1), "steps": steps,
                         "wall_ms_per_step": round(wall * 1000 / max(steps, 1), 3),
                         # from the first decode step's start to the last one's end: the gap to step_ms is time
                         # between steps (the scheduler loop, waiting for the GIL)
                         "decode_span_ms_per_step": round((span[-1] - span[0]) * 1000 / max(steps, 1), 3),
                         "outside_decode_ms": round((wall - (span[-1] - span[0])) * 1000, 1),
                         **{f"{k}_ms": round(v * 1000 / max(steps, 1), 3) for k, v in acc.items()},
                         "gpu_forward_ms": round(gpu, 3) if gpu is not None else None}
    finally:
        del engine._step, engine._sample, engine._advance
        static.StaticRunning.forward, static.StaticRunning._replay = real_forward, real_replay
    return out


def step_profile(server, names: list[str], prompt: str, max_tokens: int, steps: int = 5) -> str:
    """A torch.profiler table (by device time) of ``steps`` decode steps of one batch of ``names``, run eagerly over
    the static cache: the kernels a CUDA graph of that step replays (a replayed graph shows as one launch). For a
    mixed batch on the bmm path (no Triton) the eager static path also gathers the rows' A/B in every step, which the
    graph path does not; lora_triton's kernels gather nothing."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = server.engine
    cuda = engine.device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    seen: list[int] = []
    real_step, real_decode = engine._step, engine.decode
    first = 10  # past the prefill and the first steps

    def step():
        if len(seen) == first:
            prof.__enter__()
        real_step()
        if len(seen) == first + steps - 1:
            if cuda:
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
        seen.append(1)

    engine._step, engine.decode = step, "static"
    try:
        timed_run(server, names, prompt, max_tokens)
    finally:
        del engine._step
        engine.decode = real_decode
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--work", default="/tmp/tunekit-serve-bench")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--swaps", type=int, default=50)
    ap.add_argument("--peft-loads", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each kind, alternated")
    ap.add_argument("--phases", action="store_true", help="also time each decode step by phase (see step_phases)")
    ap.add_argument("--lora-tuning", default=None, metavar="JSON",
                    help="launch shapes for lora_triton's kernels (see benchmarks/serve_lora_kernels.py)")
    ap.add_argument("--profile-step", action="store_true",
                    help="also print kernel tables of 5 base and 5 mixed-adapter decode steps (see step_profile; to stderr)")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (served unmerged) instead of LoRA")
    ap.add_argument("--decode", default="auto", choices=["auto", "graphs", "static", "eager"],
                    help="the engine's decode step (auto: CUDA graphs over a static KV cache on a GPU)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "liger", "off"],
                    help="fused kernels of the base (auto: Liger's on a GPU when installed)")
    args = ap.parse_args()
    if args.lora_tuning:
        from tunekit.serve.embedded import lora_triton

        lora_triton.TUNING.update(json.loads(args.lora_tuning))

    import peft
    import torch
    import transformers

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    emit({"step": "env", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
          "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = build_base(work, args.tiny)
    adapters = build_adapters(base, work, args.adapters, args.rank, device, dora=args.dora)

    peft_ms = peft_load_adapter_ms(base, adapters, device, args.peft_loads)
    emit({"figure": "peft_load_adapter_ms", "median": round(statistics.median(peft_ms), 2),
          "min": round(min(peft_ms), 2), "n": len(peft_ms), "rank": args.rank})

    from tunekit.serve.embedded import start_in_thread

    names = [f"ad{i:02d}" for i in range(len(adapters))]
    t = time.time()
    server = start_in_thread(str(base), dict(zip(names, map(str, adapters))), max_loras=len(names),
                             max_batch_size=max(32, len(names)), batch_window_ms=0, decode=args.decode, kernels=args.kernels)
    emit({"step": "server_start", "seconds": round(time.time() - t, 1), "decode": server.engine.stats()["decode"],
          "kernels": server.engine.stats()["kernels"]})
    try:
        engine = server.engine
        engine.eos_ids = set()  # every request generates exactly max_tokens: equal work in both runs
        copy_ms, acquire_ms = swap_figures(engine, names, device, args.swaps)
        slot_mb = engine.pool.slots.storage[1].numel() * engine.pool.slots.storage.element_size() / 2**20
        emit({"figure": "swap_ms", "dora": args.dora, "median": round(statistics.median(copy_ms), 3), "p90":
              round(sorted(copy_ms)[int(0.9 * len(copy_ms))], 3), "n": len(copy_ms), "rank": args.rank,
              "slot_mb": round(slot_mb, 1), "pinned_host_source": device == "cuda", "target_ms": 10,
              "meets_target": statistics.median(copy_ms) <= 10})
        emit({"figure": "acquire_ms", "median": round(statistics.median(acquire_ms), 3), "n": len(acquire_ms)})
        emit({"figure": "swap_speedup_vs_peft", "value": round(statistics.median(peft_ms) /
                                                               statistics.median(copy_ms), 1)})

        max_tokens = args.max_tokens or (16 if args.tiny else 128)
        prompt = "Summarize the following text in one sentence: " + "the quick brown fox jumps over the lazy dog " * 4
        for name in names:  # make every adapter resident: the figure is decode, not first-swap cost
            engine.generate(prompt, name, max_tokens=1, temperature=0)
        engine.generate(prompt, None, max_tokens=1, temperature=0)
        figs = throughput(server, {"base": [str(base)] * len(names), "adapters": names}, prompt, max_tokens,
                          args.repeats)
        stats = engine.stats()
        emit({"step": "lora", **{k: stats.get(k) for k in ("lora_decode", "lora_fused")}})
        base_fig, mixed_fig = figs["base"], figs["adapters"]
        def target(value: float, goal: float) -> dict:  # issue 15's targets are for the 8B shape on a GPU
            return {} if args.tiny else {"target": goal, "meets_target": value >= goal}

        emit({"figure": "tokens_per_s_base", **base_fig, **target(base_fig["tokens_per_s"], 1500)})
        emit({"figure": "tokens_per_s_distinct_adapters", "dora": args.dora, **mixed_fig})
        ratio = mixed_fig["tokens_per_s"] / base_fig["tokens_per_s"]
        # runs i of both kinds ran back to back: the median of their ratios is less exposed to drift
        paired = [m / b for m, b in zip(mixed_fig["runs"], base_fig["runs"])]
        emit({"figure": "throughput_ratio", "value": round(ratio, 3), **target(ratio, 0.85),
              "of": "median adapters tokens/s / median base tokens/s",
              "paired_median": round(statistics.median(paired), 3), "paired": [round(r, 3) for r in paired]})
        if args.phases:
            for kind, rec in step_phases(server, {"base": [str(base)] * len(names), "adapters": names}, prompt,
                                         max_tokens).items():
                emit({"figure": "step_phases", "kind": kind, "decode": engine.stats()["decode"], **rec})
        if args.profile_step:
            for kind, rows in (("base", [str(base)] * len(names)), ("adapter", names)):
                print(f"[profile] 5 decode steps, {len(names)} {kind} rows, static cache run eagerly\n"
                      + step_profile(server, rows, prompt, max_tokens), file=sys.stderr, flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
