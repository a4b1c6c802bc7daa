"""Host time of detokenizing a decode step: 16 rows, the whole output every step vs the incremental window.

    python benchmarks/serve_detok.py [--rows 16] [--lengths 128 512 2048]

The embedded server turns each row's tokens into text at every decode step (to stream it and to find stop
strings). With the 8B benchmark's tokenizer (serve_hotswap.big_vocab_tokenizer: 128,256 ids), random ids, this
times the step's detokenizing at a row length of N tokens: decoding each row's whole output (the engine before
detok.py) and detok.grow_text's window. Pure CPU; prints one JSON line per length.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    a = ap.parse_args()
    from serve_hotswap import big_vocab_tokenizer

    from tunekit.serve.embedded.detok import grow_text
    from tunekit.serve.embedded.requests import GenRequest, SamplingParams

    tok = big_vocab_tokenizer(128256)
    rng = random.Random(0)
    for n in a.lengths:
        rows = [GenRequest([1], None, SamplingParams(), lambda *x: None) for _ in range(a.rows)]
        whole, window = [], []
        for step in range(n):
            for r in rows:
                r.generated.append(rng.randrange(300, tok.vocab_size))  # filler words: every id decodes
            if step >= n - 20:  # time the last 20 steps, at a row length of ~n
                t = time.perf_counter()
                for r in rows:
                    tok.decode(r.generated, skip_special_tokens=True)
                whole.append(time.perf_counter() - t)
            t = time.perf_counter()
            for r in rows:
                grow_text(tok, r)
            if step >= n - 20:
                window.append(time.perf_counter() - t)
        assert all(r.text == tok.decode(r.generated, skip_special_tokens=True) for r in rows)
        print(json.dumps({"rows": a.rows, "tokens_per_row": n,
                          "whole_output_ms_per_step": round(statistics.median(whole) * 1000, 3),
                          "incremental_ms_per_step": round(statistics.median(window) * 1000, 3)}), flush=True)


if __name__ == "__main__":
    main()
