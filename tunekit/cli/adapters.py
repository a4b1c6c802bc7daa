"""tunekit adapters list|show|rm: the adapter registry (local adapters and managed models)."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    ad = sub.add_parser("adapters", help="the adapter registry")
    verbs = ad.add_subparsers(dest="verb", metavar="VERB")
    p = verbs.add_parser("list", help="registered adapters")
    p.add_argument("--base-model")
    p.add_argument("--backend")
    p.add_argument("--data-sha256")
    p.add_argument("--sort", metavar="METRIC",
                   help="order by the newest recorded eval METRIC (best first; with --data-sha256, on that data)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=adapters_list)
    p = verbs.add_parser("show", help="one adapter's provenance, metrics, evals and merge check")
    p.add_argument("adapter", help="adapter id, name or job id")
    p.set_defaults(func=adapters_show)
    p = verbs.add_parser("compare", help="two adapters' recorded eval results side by side")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=adapters_compare)
    p = verbs.add_parser("rm", help="remove a registry entry (files are kept unless --delete-files)")
    p.add_argument("adapter")
    p.add_argument("--delete-files", action="store_true")
    p.set_defaults(func=adapters_rm)
    ad.set_defaults(func=lambda args: (ad.print_help(), 2)[1])


def adapters_list(args: argparse.Namespace) -> int:
    from ..store import default_store
    from ._output import print_json, table

    items = default_store().list_adapters(base_model=args.base_model, backend=args.backend,
                                          data_sha256=None if args.sort else args.data_sha256)
    if args.sort:
        return _list_sorted(items, args)
    if args.json:
        print_json([a.__dict__ for a in items])
        return 0
    rows = []
    for a in items:
        check = a.merge_check or {}
        merged = ("FLAGGED" if check.get("flagged") else "ok") if check else ""
        rows.append([a.id, a.name or "", a.backend, a.base_model or "", (a.data_sha256 or "")[:12], a.location,
                     merged, time.strftime("%Y-%m-%d %H:%M", time.localtime(a.created_at))])
    print(table(["ID", "NAME", "BACKEND", "BASE MODEL", "DATA SHA256", "LOCATION", "MERGE", "CREATED"], rows))
    return 0


def adapters_show(args: argparse.Namespace) -> int:
    from ..adapters.resolve import find_entry
    from ._output import print_json

    print_json(find_entry(args.adapter).__dict__)
    return 0


def _list_sorted(items: list, args: argparse.Namespace) -> int:
    """Adapters with a recorded value of the metric, best first; those without one last."""
    from ..eval.record import LOWER_IS_BETTER, latest_metric
    from ._output import print_json, table

    values = {a.id: latest_metric(a.info, args.sort, args.data_sha256) for a in items}
    sign = 1 if args.sort in LOWER_IS_BETTER else -1
    items = sorted(items, key=lambda a: (values[a.id] is None, sign * (values[a.id] or 0)))
    if args.json:
        print_json([{**a.__dict__, "sort_value": values[a.id]} for a in items])
        return 0
    rows = [[a.id, a.name or "", a.backend, a.base_model or "", "" if values[a.id] is None else f"{values[a.id]:.4g}",
             a.location] for a in items]
    print(table(["ID", "NAME", "BACKEND", "BASE MODEL", args.sort.upper(), "LOCATION"], rows))
    return 0


def adapters_compare(args: argparse.Namespace) -> int:
    """The newest eval of each on the same data (the newest data both were evaluated on)."""
    from .._exceptions import ConfigError
    from ..adapters.resolve import find_entry
    from ..eval.record import latest_evals
    from ._output import table

    a, b = find_entry(args.a), find_entry(args.b)
    evals_a, evals_b = latest_evals(a.info), latest_evals(b.info)
    shared = [e for e in reversed(evals_a) if any(f["data"]["sha256"] == e["data"]["sha256"] for f in evals_b)]
    if not shared:
        raise ConfigError(f"{a.id} and {b.id} have no eval results on the same data", field="adapter",
                          hint=f"run `tunekit eval {a.id} {b.id} --data HELD_OUT.jsonl`")
    ea = shared[0]
    eb = next(f for f in reversed(evals_b) if f["data"]["sha256"] == ea["data"]["sha256"])
    names = [m for m in ea["metrics"]] + [m for m in eb["metrics"] if m not in ea["metrics"]]

    def show(entry: dict, metric: str) -> str:
        if metric not in entry["metrics"]:
            return ""
        lo, hi = entry.get("ci", {}).get(metric, (None, None))
        interval = f" [{lo:.3g}, {hi:.3g}]" if lo is not None else ""
        return f"{entry['metrics'][metric]:.4g}{interval}"

    print(f"data {ea['data']['path']} (sha256 {ea['data']['sha256'][:12]}, {ea['data']['rows']} rows)")
    print(table(["METRIC", a.name or a.id, b.name or b.id], [[m, show(ea, m), show(eb, m)] for m in names]))
    if ea.get("settings") != eb.get("settings"):
        print(f"note: decoding settings differ: {ea.get('settings')} vs {eb.get('settings')}")
    return 0


def adapters_rm(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ..adapters.resolve import find_entry
    from ..store import default_store

    entry = find_entry(args.adapter)
    default_store().remove_adapter(entry.id)
    if args.delete_files and entry.backend == "local" and Path(entry.location).is_dir():
        shutil.rmtree(entry.location)
        print(f"removed {entry.id} and deleted {entry.location}")
    else:
        print(f"removed {entry.id} from the registry")
    return 0
