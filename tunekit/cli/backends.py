"""tunekit backends: the known backends and whether their extra is installed."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="list backends and how to install them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..backends import available_backends
    from ._output import print_json, table

    items = available_backends()
    if args.json:
        print_json(items)
    else:
        print(table(["BACKEND", "INSTALLED", "INSTALL"],
                    [[b["name"], "yes" if b["installed"] else "no", b["install"] or ""] for b in items]))
    return 0
