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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=adapters_list)
    p = verbs.add_parser("show", help="one adapter's provenance, metrics and merge check")
    p.add_argument("adapter", help="adapter id, name or job id")
    p.set_defaults(func=adapters_show)
    p = verbs.add_parser("rm", help="remove a registry entry (files are kept unless --delete-files)")
    p.add_argument("adapter")
    p.add_argument("--delete-files", action="store_true")
    p.set_defaults(func=adapters_rm)
    ad.set_defaults(func=lambda args: (ad.print_help(), 2)[1])


def adapters_list(args: argparse.Namespace) -> int:
    from ..store import default_store
    from ._output import print_json, table

    items = default_store().list_adapters(base_model=args.base_model, backend=args.backend,
                                          data_sha256=args.data_sha256)
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
    from ..store import default_store
    from ._output import print_json

    print_json(default_store().get_adapter(args.adapter).__dict__)
    return 0


def adapters_rm(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ..store import default_store

    store = default_store()
    entry = store.get_adapter(args.adapter)
    store.remove_adapter(entry.id)
    if args.delete_files and entry.backend == "local" and Path(entry.location).is_dir():
        shutil.rmtree(entry.location)
        print(f"removed {entry.id} and deleted {entry.location}")
    else:
        print(f"removed {entry.id} from the registry")
    return 0
