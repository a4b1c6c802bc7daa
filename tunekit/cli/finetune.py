"""tunekit finetune DATA --base-model M --backend B [--spec FILE] [--wait]: start a job.
tunekit finetune --from JOB --backend B --base-model M: the same data and spec as a recorded job, elsewhere."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="validate the data, plan, and start a fine-tuning job")
    p.add_argument("data", nargs="?", help="training JSONL")
    p.add_argument("--from", dest="from_job", metavar="JOB",
                   help="re-run a recorded job's data and spec (e.g. an imported OpenAI job); prints the plan first")
    p.add_argument("--backend", required=True)
    p.add_argument("--base-model", help="overrides the spec's base_model")
    p.add_argument("--spec", help="spec file (JSON or YAML) with any TrainingSpec fields")
    p.add_argument("--validation-data")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="set a spec field, e.g. --set hyperparameters.epochs=2 (repeatable)")
    p.add_argument("--on-unsupported", choices=["raise", "warn", "ignore"], default="raise")
    p.add_argument("--max-cost", type=float, metavar="USD",
                   help="refuse the job when its estimated cost is above USD (before anything is uploaded)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end (exit code as `jobs wait`)")
    p.set_defaults(func=run)


def _apply_sets(spec: dict, assignments: list[str]) -> dict:
    from .._exceptions import ConfigError

    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE", field=item)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = spec
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return spec


def _show_cost(estimate) -> None:
    import sys

    sys.stderr.write(estimate.line() + "\n")
    for note in estimate.notes:
        sys.stderr.write(f"note: {note}\n")


def run(args: argparse.Namespace) -> int:
    from .._exceptions import ConfigError
    from ..api import finetune, finetune_from, load_spec

    if (args.data is None) == (args.from_job is None):
        raise ConfigError("give the training data or --from JOB (one of them)", field="data")
    spec = load_spec(args.spec).model_dump(exclude_unset=True) if args.spec else {}
    spec = _apply_sets(spec, args.set)
    if args.base_model:
        spec["base_model"] = args.base_model
    if args.from_job:
        _show_plan(args, spec)
        job = finetune_from(args.from_job, backend=args.backend, spec=spec, on_unsupported=args.on_unsupported,
                            validation_data=args.validation_data, max_cost=args.max_cost, on_cost=_show_cost)
    else:
        job = finetune(args.data, spec, backend=args.backend, validation_data=args.validation_data,
                       on_unsupported=args.on_unsupported, max_cost=args.max_cost, on_cost=_show_cost)
    print(job.id)
    if args.wait:
        from .jobs import jobs_wait

        return jobs_wait(argparse.Namespace(job_id=job.id, timeout=None, interval=None, no_progress=False,
                                            json=False))
    return 0


def _show_plan(args: argparse.Namespace, overrides: dict) -> None:
    """What carries over (mapped), what is transformed and what cannot, before anything is sent (stderr)."""
    import sys
    import warnings

    from ..api import merge_spec, plan, source_of
    from .plan import print_plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan(merge_spec(source_of(args.from_job)[1], overrides), args.backend, on_unsupported="ignore")
    print(f"plan for {args.from_job} on {args.backend}:", file=sys.stderr)
    print_plan(result, file=sys.stderr)
