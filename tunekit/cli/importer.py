"""tunekit import openai [FTJOB...|--all]: record a provider's fine-tuning jobs as tunekit jobs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="record a provider's fine-tuning jobs (data, spec, events, model) "
                                      "as tunekit jobs")
    providers = p.add_subparsers(dest="provider", metavar="PROVIDER")
    o = providers.add_parser("openai", help="OpenAI fine-tuning jobs (OPENAI_API_KEY); importing again updates them")
    o.add_argument("jobs", nargs="*", metavar="FTJOB", help="OpenAI job ids (ftjob-...)")
    o.add_argument("--all", action="store_true", dest="all_jobs", help="every fine-tuning job of the account")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=import_openai)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def import_openai(args: argparse.Namespace) -> int:
    from ..api import import_openai
    from ._output import print_json, table
    from .jobs import _record_json

    jobs = import_openai(args.jobs, all_jobs=args.all_jobs)
    if args.json:
        print_json([{**_record_json(j), "data": j.record.data} for j in jobs])
        return 0
    rows = []
    for job in jobs:
        train = (job.record.data or {}).get("train") or {}
        data = "missing" if train.get("missing") else f"{train.get('rows')} rows" if train else "none"
        rows.append([job.id, job.remote_id, job.status.value, job.result.model if job.result else "", data])
    print(table(["JOB", "OPENAI JOB", "STATUS", "MODEL", "TRAINING DATA"], rows))
    for job in jobs:
        for note in (job.record.data or {}).get("import_notes", []):
            print(f"note: {job.id}: {note}")
    return 0
