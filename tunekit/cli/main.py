"""Entry point: argparse tree, the error table, exit codes.

Exit codes: 0 ok; 1 failed (invalid data, failed/cancelled job); 2 usage error or known tunekit error;
124 ``jobs wait`` timed out; 130 interrupted. A known error is one stderr line, ``error: ...; hint: ...``.
Tracebacks only with TUNEKIT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from . import adapters, backends, distill, export, finetune, importer, jobs, merge, plan, serve, validate
from . import eval as eval_cmd

NOUNS = (validate, plan, finetune, jobs, backends, adapters, merge, eval_cmd, export, serve, importer, distill)


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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # the one table that turns known errors into one line + next step
        from .._exceptions import DataValidationError, TunekitError
        from .._secrets import mask_exception

        mask_exception(exc)  # what is printed below, traceback included, shows no credential

        if debug_enabled() or not isinstance(exc, TunekitError):
            if not isinstance(exc, TunekitError) and not debug_enabled():
                sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n(set TUNEKIT_DEBUG=1 for the traceback)\n")
                return 1
            raise
        sys.stderr.write(one_line(exc) + "\n")
        return 1 if isinstance(exc, DataValidationError) else 2


def one_line(exc: Exception) -> str:
    """``error: MESSAGE; hint: NEXT STEP`` on one line, whatever newlines the message carries."""
    hint = getattr(exc, "hint", None)
    text = f"error: {exc}" + (f"; hint: {hint}" if hint else "")
    return re.sub(r"\s*[\r\n]+\s*", " ", text.strip())  # only line breaks: a path keeps its spaces


def _stdout_closed() -> int:
    """The reader went away (``tunekit jobs events JOB | head -1``): stop quietly.

    As Python's docs advise (signal module, "Note on SIGPIPE"): point stdout at devnull so the final
    flush at exit does not raise again, and exit 1.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
