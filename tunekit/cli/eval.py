"""tunekit eval TARGET... --data FILE: evaluate and compare targets on held-out data (thin over tunekit.evaluate)."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate and compare adapters, models and endpoints on held-out data",
        description="Each TARGET is a job id, a registry adapter, an adapter or model directory, a base model id, "
                    "or URL#MODEL (any OpenAI-compatible endpoint). Local targets are served in-process.")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    p.add_argument("--data", required=True, help="held-out JSONL (prompt/response, chat or preference rows)")
    p.add_argument("--metric", action="append", dest="metrics", metavar="METRIC",
                   help="loss, exact_match, contains, regex, regex:PATTERN, json_valid (repeatable; "
                        "default: loss, exact_match, contains)")
    p.add_argument("--out", help="write the report: .html (one self-contained file) or .md")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.add_argument("--base-url", help="every plain TARGET name is a model at this OpenAI-compatible endpoint")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the --base-url key")
    p.add_argument("--base-model", help="the base of adapter directories that do not name it")
    p.add_argument("--judge", metavar="MODEL", help="pairwise LLM judge model (needs --judge-base-url)")
    p.add_argument("--judge-base-url", metavar="URL")
    p.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge's key")
    p.add_argument("--baseline", help="the TARGET the judge compares the others with (default: the first)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy, deterministic decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--no-resume", action="store_true", help="ignore answers cached by an earlier run")
    p.add_argument("--no-record", action="store_true", help="do not record results in the adapter registry")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.run import DEFAULT_METRICS, evaluate
    from ._output import print_json

    def notice(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = evaluate(
        args.targets, args.data, metrics=args.metrics or DEFAULT_METRICS, base_url=args.base_url,
        api_key=_env(args.api_key_env), base_model=args.base_model, judge=args.judge,
        judge_base_url=args.judge_base_url, judge_api_key=_env(args.judge_api_key_env), baseline=args.baseline,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        concurrency=args.concurrency, resume=not args.no_resume, record=not args.no_record, device=args.device,
        dtype=args.dtype, on_notice=notice)
    if args.out:
        notice(f"wrote {result.write(args.out)}")
    if args.json:
        print_json(result.to_json())
    else:
        print(result.to_markdown(), end="")
    return 0


def _env(var: str | None) -> str | None:
    if not var:
        return None
    from .._exceptions import ConfigError

    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"environment variable {var} is not set", field="api_key", hint=f"export {var}=...")
    return value
