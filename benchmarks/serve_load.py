"""Embedded server under a bounded hostile load: latency, throughput, errors by kind, peak memory.

Starts the embedded server on a base and --adapters random r=16 adapters (built under --work like
serve_hotswap.py, or an existing base with --model), then sends --requests requests, at most
--concurrency in flight, drawn with a fixed seed:

  valid       completions and chat, streaming and not, over the base and every adapter
  hostile     --hostile of them: temperature 1e-40, a 2**70 seed, a 10 MB prompt, malformed JSON,
              token ids outside the vocabulary, 17 prompts in one request, an unknown model
  disconnect  --disconnect of them: long requests whose client goes away after 0.3 s

and prints one JSON line per figure: p50/p99 latency of valid requests, completion tokens/s, the
status codes of each kind (target: every valid request 200, every hostile one 4xx: zero 5xx), the
server's cancelled rows, the slowest /health answer during the run, and peak memory (process RSS
sampled every 50 ms; on a GPU also torch's peak allocated).

    python benchmarks/serve_load.py --tiny                     # CPU, tiny model
    python benchmarks/serve_load.py --work /tmp/tk-bench       # GPU, 8B shape (as serve_hotswap.py)
    python benchmarks/serve_load.py --model path/to/base       # any base
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_hotswap import build_adapters, build_base, emit  # noqa: E402

HOSTILE = {  # kind -> request body (None: a malformed body)
    "tiny_temperature": {"temperature": 1e-40},
    "huge_seed": {"temperature": 1.0, "seed": 2**70},
    "prompt_10mb": {"prompt": "a" * 10_000_000},
    "malformed_json": None,
    "token_out_of_vocab": {"prompt": [1, 2, 10**9]},
    "too_many_rows": {"prompt": ["a"] * 17},
    "unknown_model": {"model": "no-such-model"},
}


class MemorySampler(threading.Thread):
    """Peak RSS of this process (server and clients), sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.start_rss = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def plan_requests(n: int, models: list[str], hostile: float, disconnect: float, max_tokens: int,
                  seed: int) -> list[tuple[str, str, dict | None, bool]]:
    """(kind, route, body, stream) for each request, in a fixed random order."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        model = models[i % len(models)]
        stream = rng.random() < 0.5
        u = rng.random()
        if u < hostile:
            kind = rng.choice(sorted(HOSTILE))
            extra = HOSTILE[kind]
            body = None if extra is None else {"model": model, "prompt": "hello", "max_tokens": 4, **extra}
            out.append((kind, "/v1/completions", body, False))
        elif u < hostile + disconnect:
            body = {"model": model, "prompt": "tell me a long story", "n": 4, "max_tokens": 10 * max_tokens,
                    "temperature": 1.0}
            out.append(("disconnect", "/v1/completions", body, stream))
        elif rng.random() < 0.3:
            body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
            out.append(("valid", "/v1/chat/completions", body, stream))
        else:
            body = {"model": model, "prompt": f"request {i}: the quick brown fox", "max_tokens": max_tokens,
                    "temperature": rng.choice([0, 0.7, 1.0])}
            out.append(("valid", "/v1/completions", body, stream))
    return out


async def one(client, url: str, kind: str, route: str, body: dict | None, stream: bool,
              results: list[dict]) -> None:
    import httpx

    t0 = time.perf_counter()
    rec: dict = {"kind": kind, "stream": stream}
    try:
        if body is None:
            r = await client.post(url + route, content=b'{"model": "x", "prompt": ',
                                  headers={"Content-Type": "application/json"})
            rec.update(status=r.status_code)
        elif kind == "disconnect":
            try:
                await asyncio.wait_for(client.post(url + route, json={**body, "stream": stream}), 0.3)
                rec.update(status="finished_before_disconnect")
            except asyncio.TimeoutError:
                rec.update(status="disconnected")
        elif stream:
            tokens, status = 0, None
            async with client.stream("POST", url + route, json={**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            status = f"in-band {chunk['error']['type']}"
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            rec.update(status=status, tokens=tokens)
        else:
            r = await client.post(url + route, json=body)
            rec.update(status=r.status_code)
            if r.status_code == 200:
                rec["tokens"] = r.json()["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        rec.update(status=f"client {type(exc).__name__}")
    rec["seconds"] = time.perf_counter() - t0
    results.append(rec)


async def health_probe(client, url: str, stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await client.get(url + "/health")
        worst[0] = max(worst[0], time.perf_counter() - t0)
        await asyncio.sleep(0.2)


async def drive(url: str, plan: list, concurrency: int) -> tuple[list[dict], float, float]:
    import httpx

    results: list[dict] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client, httpx.AsyncClient(timeout=600) as probe:
        stop, worst = asyncio.Event(), [0.0]
        prober = asyncio.create_task(health_probe(probe, url, stop, worst))

        async def guarded(item) -> None:
            async with sem:
                await one(client, url, *item, results)

        t0 = time.perf_counter()
        await asyncio.gather(*(guarded(item) for item in plan))
        wall = time.perf_counter() - t0
        stop.set()
        await prober
    return results, wall, worst[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU")
    ap.add_argument("--work", default="/tmp/tunekit-serve-bench")
    ap.add_argument("--model", help="serve this base instead of building one under --work")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=4, help="fewer slots than adapters: swaps happen")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--hostile", type=float, default=0.05)
    ap.add_argument("--disconnect", type=float, default=0.05)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    emit({"step": "env", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
          "torch": torch.__version__})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.model) if args.model else build_base(work, args.tiny)
    adapters = build_adapters(base, work / f"adapters-{base.name}", args.adapters, 16, device) if args.adapters else []

    from tunekit.serve.embedded import start_in_thread

    names = [f"ad{i:02d}" for i in range(len(adapters))]
    server = start_in_thread(str(base), dict(zip(names, map(str, adapters))), max_loras=args.max_loras,
                             batch_window_ms=2)
    try:
        max_tokens = args.max_tokens or (16 if device == "cpu" else 128)
        plan = plan_requests(args.requests, [str(base), *names], args.hostile, args.disconnect, max_tokens,
                             args.seed)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mem = MemorySampler()
        mem.start()
        results, wall, worst_health = asyncio.run(drive(server.url, plan, args.concurrency))
        mem.stop.set()
        mem.join()
        stats = server.engine.stats()
    finally:
        server.stop()

    valid = [r for r in results if r["kind"] == "valid"]
    ok = [r for r in valid if r["status"] == 200]
    lat = sorted(r["seconds"] for r in ok)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r["kind"]][str(r["status"])] += 1
    bad_valid = len(valid) - len(ok)
    hostile_not_4xx = sum(1 for r in results if r["kind"] in HOSTILE
                          and not (isinstance(r["status"], int) and 400 <= r["status"] < 500))
    emit({"figure": "latency_s", "p50": round(statistics.median(lat), 3),
          "p99": round(lat[int(0.99 * (len(lat) - 1))], 3), "max": round(lat[-1], 3), "valid_requests": len(valid)})
    emit({"figure": "tokens_per_s", "value": round(sum(r.get("tokens", 0) for r in ok) / wall, 1),
          "completion_tokens": sum(r.get("tokens", 0) for r in ok), "wall_s": round(wall, 1),
          "requests": len(results), "concurrency": args.concurrency, "max_tokens": max_tokens})
    emit({"figure": "status_by_kind", **{k: dict(v) for k, v in sorted(by_kind.items())}})
    emit({"figure": "isolation", "valid_not_200": bad_valid, "hostile_not_4xx": hostile_not_4xx,
          "meets_target": bad_valid == 0 and hostile_not_4xx == 0,
          "cancelled_rows": stats.get("cancelled_rows", 0), "failed_rows": stats.get("failed_rows", 0),
          "failed_batches": stats.get("failed_batches", 0), "pending_after": stats["pending"],
          "slowest_health_s": round(worst_health, 3)})
    rec = {"figure": "memory", "rss_start_mb": round(mem.start_rss / 2**20),
           "rss_peak_mb": round(mem.peak / 2**20), "rss_growth_mb": round((mem.peak - mem.start_rss) / 2**20)}
    if device == "cuda":
        rec["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    emit(rec)
    return 0 if bad_valid == 0 and hostile_not_4xx == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
