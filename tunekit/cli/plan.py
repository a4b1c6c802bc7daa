"""tunekit plan SPEC --backend B: what the backend would send for each field you set."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show how a backend honours each field of a spec (mapped/transformed/refused)")
    p.add_argument("spec", help="spec file (JSON or YAML)")
    p.add_argument("--backend", required=True)
    p.add_argument("--rows", type=int, help="training rows (for conversions that need it, e.g. warmup steps)")
    p.add_argument("--on-unsupported", choices=["raise", "warn", "ignore"], default="warn",
                   help="the CLI shows refusals by default; 'raise' exits 2 on any")
    p.add_argument("--data", help="training JSONL: validate it and show the estimated cost")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..api import plan
    from ._output import print_json, short, table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(args.spec, args.backend, on_unsupported=args.on_unsupported, rows=args.rows)
    estimate = None
    if args.data:
        from ..api import estimate_cost

        estimate = estimate_cost(args.data, args.spec, backend=args.backend)
    if args.json:
        print_json({**result.model_dump(mode="json"), **({"cost": estimate.to_dict()} if estimate else {})})
        return 0
    rows = []
    for d in result.fields:
        if d.disposition == "unsupported":
            sent = ""
        elif d.target is None:
            sent = "(nothing to send)"
        else:
            sent = f"{d.target} = {short(d.sent, 40)}"
        rows.append([d.field, short(d.value, 30), d.disposition, sent, d.reason or ""])
    print(table(["FIELD", "VALUE", "DISPOSITION", "SENT AS", "REASON"], rows))
    for note in result.notes:
        print(f"note: {note}")
    if estimate is not None:
        print(estimate.line())
        for note in estimate.notes:
            print(f"note: {note}")
    print("\nrequest:")
    print_json(result.request)
    return 0
