"""tunekit jobs list|status|events|wait|cancel|resume|metrics|reconcile."""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="inspect and control jobs on any backend")
    verbs = jobs.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("list", help="jobs in the store, newest first")
    p.add_argument("--backend")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=jobs_list)

    p = verbs.add_parser("status", help="one job's status (asks the backend unless the job is over)")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=jobs_status)

    p = verbs.add_parser("events", help="a job's events")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=jobs_events)

    p = verbs.add_parser("wait", help="wait for a job to end (exit 0 succeeded, 1 failed/cancelled, 124 timed out)")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float)
    p.add_argument("--interval", type=float, help="seconds between polls (default: the backend's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=jobs_wait)

    p = verbs.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.set_defaults(func=jobs_cancel)

    p = verbs.add_parser("resume", help="continue a failed or cancelled job from its last checkpoint")
    p.add_argument("job_id")
    p.set_defaults(func=jobs_resume)

    p = verbs.add_parser("metrics", help="step metrics of a job; --plot writes the loss curve as PNG")
    p.add_argument("job_id")
    p.add_argument("--plot", metavar="PNG", help="write the training/validation loss curve here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=jobs_metrics)

    p = verbs.add_parser("reconcile", help="re-attach jobs whose submit outcome was lost; without JOB, also list "
                                           "remote jobs tagged by tunekit that no job owns (orphans)")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--backend", help="look for orphans on this backend only (default: those the store uses)")
    p.add_argument("--cancel-orphans", action="store_true", help="cancel the orphans that are still live")
    p.set_defaults(func=jobs_reconcile)

    jobs.set_defaults(func=lambda args: (jobs.print_help(), 2)[1])


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _record_json(job) -> dict:
    r = job.record
    return {"id": r.id, "backend": r.backend, "status": r.status.value, "raw_status": r.raw_status,
            "remote_id": r.remote_id, "error": r.error, "progress": r.progress,
            "result": r.result.model_dump(mode="json") if r.result else None,
            "created_at": r.created_at, "updated_at": r.updated_at}


def jobs_list(args: argparse.Namespace) -> int:
    from ..api import list_jobs
    from ._output import print_json, table

    items = list_jobs(backend=args.backend, status=args.status, limit=args.limit)
    if args.json:
        print_json([_record_json(j) for j in items])
        return 0
    rows = [[j.id, j.backend_name, j.status.value, j.raw_status or "", j.spec.base_model,
             _fmt_time(j.record.created_at)] for j in items]
    print(table(["ID", "BACKEND", "STATUS", "RAW", "BASE MODEL", "CREATED"], rows))
    return 0


def jobs_status(args: argparse.Namespace) -> int:
    from ..api import get_job
    from ..job import progress_line
    from ._output import print_json

    job = get_job(args.job_id).refresh()
    if args.json:
        print_json({**_record_json(job), "stalled_s": job.stalled_for, "unsaved": job.unsaved,
                    "plan_changed": [e.data.get("changes") for e in job.plan_changes]})
        return 0
    print(progress_line(job.record))
    for event in job.plan_changes:  # the worker trained something other than what the plan showed: say so
        print(event.message)
    if job.remote_id:
        print(f"remote id: {job.remote_id}")
    if job.error:
        print(f"error: {job.error}")
    if job.unsaved:
        print(f"note: {job.unsaved}")
    if job.result:
        res = job.result
        print(f"result: {res.model}")
        if res.registry_id:
            print(f"registry entry: {res.registry_id}")
        for k, v in sorted(res.metrics.items()):
            print(f"  {k}: {v}")
    return 0


def jobs_events(args: argparse.Namespace) -> int:
    import json

    from ..api import get_job

    job = get_job(args.job_id)
    for seq, event in job.events(follow=args.follow):
        if args.json:
            print(json.dumps({"seq": seq, **event.model_dump(mode="json")}), flush=True)
        else:
            print(f"{_fmt_time(event.created_at)}  {event.level:<7} {event.type:<8} {event.message}", flush=True)
    return 0


def jobs_wait(args: argparse.Namespace) -> int:
    from ..api import get_job
    from ..job import WaitTimeout, progress_line
    from ._output import print_json

    job = get_job(args.job_id)
    try:
        job.wait(timeout=args.timeout, poll_interval=args.interval,
                 progress=False if (args.no_progress or args.json) else None)
    except WaitTimeout as exc:
        sys.stderr.write(f"timed out: {exc}\n")
        return 124
    if args.json:
        print_json(_record_json(job))
    else:
        print(progress_line(job.record))
        if job.error:
            print(f"error: {job.error}")
        if job.result and job.result.model:
            print(f"result: {job.result.model}")
    return 0 if job.status.value == "succeeded" else 1


def jobs_cancel(args: argparse.Namespace) -> int:
    from ..api import get_job

    job = get_job(args.job_id).cancel()
    print(f"{job.id}: {job.status.value}")
    return 0


def jobs_resume(args: argparse.Namespace) -> int:
    from ..api import get_job

    job = get_job(args.job_id).resume()
    print(f"{job.id}: {job.status.value} (follow with `tunekit jobs wait {job.id}`)")
    return 0


def jobs_metrics(args: argparse.Namespace) -> int:
    from ..api import get_job
    from ._output import print_json, table

    job = get_job(args.job_id)
    rows = job.metrics()
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"{job.id}: no step metrics recorded (managed backends report metrics as events)")
        return 0
    from ..plot import terminal_plot

    print(terminal_plot(rows))
    keys = ["split", "step", "loss", "lr", "tokens_per_s"]
    print(table([k.upper() for k in keys], [[_num(r.get(k)) for k in keys] for r in rows[-10:]]))
    if args.plot:
        from ..plot import plot_metrics

        print(f"wrote {plot_metrics(rows, args.plot)}")
    return 0


def _num(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def jobs_reconcile(args: argparse.Namespace) -> int:
    from ..api import find_orphans, reconcile

    for job in reconcile(args.job_id):
        state = f"attached to {job.remote_id}" if job.remote_id else "no remote job found"
        print(f"{job.id}: {job.status.value}: {state}")
    if args.job_id:
        return 0
    orphans = find_orphans(args.backend, cancel=args.cancel_orphans)
    for o in orphans:
        done = "cancelled" if o.cancelled else o.status.value
        print(f"orphan: {o.backend} {o.remote_id} (tag {o.job_id}, {done}): {o.reason}")
    if any(not o.cancelled and not o.status.terminal for o in orphans):
        print("live orphans are billed: cancel them with `tunekit jobs reconcile --cancel-orphans`")
    return 0
