"""Entry point: argparse tree, the error table, exit codes.

Exit codes: 0 ok; 1 failed (invalid data, failed/cancelled job); 2 usage error or known tunekit error;
124 ``jobs wait`` timed out; 130 interrupted. Tracebacks only with TUNEKIT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import adapters, backends, distill, finetune, importer, jobs, merge, plan, serve, validate

NOUNS = (validate, plan, finetune, jobs, backends, adapters, merge, serve, importer, distill)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunekit",
        description="LoRA fine-tuning on OpenAI, Together AI, Fireworks AI or your own GPU, with one API.",
        epilog="Set TUNEKIT_DEBUG=1 for tracebacks. Jobs live in $TUNEKIT_HOME/state.db (default ~/.tunekit).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"tunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for noun in NOUNS:
        noun.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .._settings import debug_enabled

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # the one table that turns known errors into one line + next step
        from .._exceptions import DataValidationError, TunekitError

        if debug_enabled() or not isinstance(exc, TunekitError):
            if not isinstance(exc, TunekitError) and not debug_enabled():
                sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n(set TUNEKIT_DEBUG=1 for the traceback)\n")
                return 1
            raise
        sys.stderr.write(f"error: {exc}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        return 1 if isinstance(exc, DataValidationError) else 2


if __name__ == "__main__":
    sys.exit(main())
