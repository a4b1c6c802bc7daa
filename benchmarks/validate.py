"""Benchmark: tunekit.data.validate on 1M prompt/response rows vs a bare json.loads loop.

    python benchmarks/validate.py [--rows 1000000] [--kind prompt_response|chat] [--repeat 3] [--keep FILE]

Each measurement runs in its own subprocess, which reports its wall time and its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, interpreter and imports included). Targets on a
2-core machine: validate <= 10 s, <= 150 MB peak RSS, >= 0.5x the bare loop's rows/s.
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

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()

VALIDATE = """
import json, resource, sys, time
t0 = time.perf_counter()
from tunekit.data import validate
t1 = time.perf_counter()
r = validate(sys.argv[1])
wall = time.perf_counter() - t1
print(json.dumps({"wall_s": wall, "import_s": t1 - t0, "rows": r.rows, "valid": r.valid, "problems": r.problem_count,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "p50": r.length.p50, "p95": r.length.p95}))
"""

BARE = """
import json, resource, sys, time
t0 = time.perf_counter()
n = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        json.loads(line)
        n += 1
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "rows": n, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def generate(path: str, rows: int, kind: str = "prompt_response", seed: int = 0) -> None:
    """Short, distinct rows like the example data (reverse a few words)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            words = rng.choices(WORDS, k=rng.randint(2, 6))
            prompt, response = f"Reverse the words ({i}): {' '.join(words)}", " ".join(reversed(words))
            if kind == "chat":
                row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}]}
            else:
                row = {"prompt": prompt, "response": response}
            f.write(json.dumps(row) + "\n")


def measure(code: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, path], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--kind", choices=["prompt_response", "chat"], default="prompt_response",
                    help="row kind to generate (targets apply to prompt_response; chat rows take the careful path)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternate validate and the bare loop this many times; report medians (a shared machine is noisy)")
    ap.add_argument("--keep", help="write the generated file here (and keep it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, "bench.jsonl")
        t0 = time.perf_counter()
        generate(path, args.rows, args.kind)
        gen_s = time.perf_counter() - t0
        size_mb = os.path.getsize(path) / 1e6
        runs = [(measure(VALIDATE, path), measure(BARE, path)) for _ in range(max(1, args.repeat))]
    vs, bs = [r[0] for r in runs], [r[1] for r in runs]
    for v in vs:
        assert v["valid"] and v["rows"] == args.rows, v
    v_wall = statistics.median(v["wall_s"] for v in vs)
    b_wall = statistics.median(b["wall_s"] for b in bs)
    v_rate, b_rate = args.rows / v_wall, args.rows / b_wall
    ratio = v_rate / b_rate
    mb = max(v["maxrss_kb"] for v in vs) / 1024
    b_mb = max(b["maxrss_kb"] for b in bs) / 1024
    v = vs[0]
    ok = lambda good: "ok" if good else "MISS"  # noqa: E731
    print(f"file: {args.rows:,} {args.kind} rows, {size_mb:.1f} MB (generated in {gen_s:.1f} s)")
    print(f"runs: {len(runs)} (validate and bare loop alternated; medians below, peak RSS = max over runs)")
    print(f"validate() call:  {v_wall:.2f} s, {v_rate:,.0f} rows/s, peak RSS {mb:.1f} MB "
          f"(targets: <= 10 s {ok(v_wall <= 10)}, <= 150 MB {ok(mb <= 150)})")
    print(f"bare json.loads loop: {b_wall:.2f} s, {b_rate:,.0f} rows/s, peak RSS {b_mb:.1f} MB")
    print(f"ratio validate/bare: {ratio:.2f}x (target >= 0.5x {ok(ratio >= 0.5)})")
    print("each run (validate s / bare s / ratio): " + ", ".join(
        f"{a['wall_s']:.2f}/{b['wall_s']:.2f}/{b['wall_s'] / a['wall_s']:.2f}x" for a, b in runs))
    print(f"import tunekit.data: {statistics.median(v['import_s'] for v in vs):.2f} s (not in the figures above)")
    print(f"length p50/p95 (characters): {v['p50']}/{v['p95']}")


if __name__ == "__main__":
    main()
