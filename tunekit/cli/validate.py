"""tunekit validate FILE [--backend B] [--json]: exit 0 valid, 1 invalid, 2 usage error."""

from __future__ import annotations

import argparse
import sys

from ._output import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a JSONL training file (every problem, with its line)")
    p.add_argument("file")
    p.add_argument("--backend", help="apply this backend's rules (row kinds, minimum rows)")
    p.add_argument("--method", choices=["sft", "dpo"], help="the training method the data is for")
    p.add_argument("--max-length", type=int, metavar="TOKENS",
                   help="the run's hyperparameters.max_length: with --backend local, rows far longer are refused "
                        "(default 2048; implies --method sft unless --method is given)")
    p.add_argument("--max-problems", type=positive_int, default=100)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import validate

    spec = None
    if args.method or args.max_length is not None:
        from ..api import load_spec

        hyper = {"max_length": args.max_length} if args.max_length is not None else {}
        spec = load_spec({"base_model": "-", "method": args.method or "sft", "hyperparameters": hyper})
    report = validate(args.file, backend=args.backend, spec=spec, max_problems=args.max_problems)
    if args.json:
        from ._output import print_json

        print_json(report)
    else:
        for line in report.format_lines():
            print(line)
        kind = report.kind.value if report.kind else "unknown"
        verdict = "valid" if report.valid else f"INVALID ({report.problem_count} problem(s))"
        stats = report.length
        length = ""
        if stats is not None and report.rows:
            length = f"; length ({stats.unit}) min {stats.min} / mean {stats.mean:.0f} / max {stats.max}"
        print(f"{report.path}: {verdict}: {report.rows} {kind} rows; sha256 {report.sha256[:12]}{length}",
              file=sys.stdout if report.valid else sys.stderr)
    return 0 if report.valid else 1
