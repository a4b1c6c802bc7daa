"""tunekit distill --model M [--prompts FILE] --out FILE: a training set from a live model's answers."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="build a training set from a live model's answers (resumes when run again)")
    p.add_argument("--model", required=True, help="the model to ask, e.g. ft:gpt-4o-mini-2024-07-18:org::abc123")
    p.add_argument("--prompts", help="JSONL of prompts (any row kind); default: the training data of the recorded "
                                     "job that produced --model (see `tunekit import openai`)")
    p.add_argument("--out", required=True, help="chat JSONL to append the answers to")
    p.add_argument("--base-url", help="an OpenAI-compatible endpoint (default: OpenAI, or OPENAI_BASE_URL); "
                                      "the key comes from OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--price", metavar="IN,OUT", help="USD per 1M input,output tokens for the estimate")
    p.add_argument("--estimate-only", action="store_true", help="print the estimate and ask nothing")
    p.set_defaults(func=run)


def _price(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    from .._exceptions import ConfigError

    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--price {text!r}: expected IN,OUT, e.g. 0.3,1.2", field="price") from None
    return low, high


def run(args: argparse.Namespace) -> int:
    from ..data.distill import distill

    report = distill(args.model, args.prompts, args.out, base_url=args.base_url, concurrency=args.concurrency,
                     max_tokens=args.max_tokens, temperature=args.temperature, price=_price(args.price),
                     estimate_only=args.estimate_only, on_estimate=lambda e: print(e, file=sys.stderr, flush=True))
    if args.estimate_only:
        return 0
    print(f"wrote {report.written} rows to {report.out} ({report.resumed} were already there)")
    for item in report.rejected:
        print(f"rejected: prompt line {item['line']}: {item['reason']}")
    if report.rejected:
        print(f"{len(report.rejected)} prompts without a usable answer: listed in {report.out}.rejected.jsonl; "
              "running the command again asks them again")
    valid = report.validation is not None and report.validation.valid
    print(f"{report.out}: {'valid' if valid else 'INVALID: run `tunekit validate ' + str(report.out) + '`'}")
    return 0 if valid else 1
