"""tunekit plan SPEC --backend B: what the backend would send for each field you set."""

from __future__ import annotations

import argparse

from ._output import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show how a backend honours each field of a spec (mapped/transformed/refused)")
    p.add_argument("spec", nargs="?", help="spec file (JSON or YAML)")
    p.add_argument("--from", dest="from_job", metavar="JOB",
                   help="plan the spec of a recorded job (e.g. an imported OpenAI job) instead of a file")
    p.add_argument("--base-model", help="overrides the spec's base_model")
    p.add_argument("--backend", required=True)
    p.add_argument("--rows", type=positive_int, help="training rows (for conversions that need it, e.g. warmup steps)")
    p.add_argument("--on-unsupported", choices=["raise", "warn", "ignore"], default="warn",
                   help="the CLI shows refusals by default; 'raise' exits 2 on any")
    p.add_argument("--data", help="training JSONL: validate it and show the estimated cost")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from .._exceptions import ConfigError
    from ..api import load_spec, plan, source_of
    from ._output import print_json

    if (args.spec is None) == (args.from_job is None):
        raise ConfigError("give a spec file or --from JOB (one of them)", field="spec")
    data = args.data
    if args.spec:
        spec = load_spec(args.spec)
    else:
        source, recorded = source_of(args.from_job)
        spec, data = load_spec(recorded), data or source
    spec = load_spec(spec, base_model=args.base_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(spec, args.backend, on_unsupported=args.on_unsupported, rows=args.rows)
    estimate = None
    if data:
        from ..api import estimate_cost

        estimate = estimate_cost(data, spec, backend=args.backend)
    if args.json:
        print_json({**result.model_dump(mode="json"), **({"cost": estimate.to_dict()} if estimate else {})})
        return 0
    print_plan(result)
    if estimate is not None:
        print(estimate.line())
        for note in estimate.notes:
            print(f"note: {note}")
    print("\nrequest:")
    print_json(result.request)
    return 0


def print_plan(result, file=None) -> None:
    """The dispositions table and the backend's notes."""
    from ._output import short, table

    rows = []
    for d in result.fields:
        if d.disposition == "unsupported":
            sent = ""
        elif d.target is None:
            sent = "(nothing to send)"
        else:
            sent = f"{d.target} = {short(d.sent, 40)}"
        rows.append([d.field, short(d.value, 30), d.disposition, sent, d.reason or ""])
    print(table(["FIELD", "VALUE", "DISPOSITION", "SENT AS", "REASON"], rows), file=file)
    for note in result.notes:
        print(f"note: {note}", file=file)
