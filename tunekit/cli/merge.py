"""tunekit merge JOB|ADAPTER [OUT] [--out DIR] [--dtype bf16|fp16]: fold an adapter into its base, then check it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its 16-bit base and check the merge",
                       description="Exit 0 when the merged model agrees with base+adapter, 1 when the merge "
                                   "check is flagged (top-1 agreement below --threshold).")
    p.add_argument("adapter", help="a job id, a registry adapter id/name, or an adapter directory")
    p.add_argument("out_dir", nargs="?", metavar="OUT", help="the same as --out")
    p.add_argument("--out", help="directory for the merged transformers checkpoint")
    p.add_argument("--base-model", help="default: the base recorded in adapter_config.json")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--check-data", help="JSONL to take check prompts from (default: the job's training data)")
    p.add_argument("--threshold", type=float, default=0.99, help="minimum top-1 agreement (default 0.99)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _out(args: argparse.Namespace) -> str:
    from .._exceptions import ConfigError

    if args.out and args.out_dir and args.out != args.out_dir:
        raise ConfigError(f"two output directories: {args.out_dir} and --out {args.out}", field="--out",
                          hint="give one: `tunekit merge ADAPTER OUT` or `tunekit merge ADAPTER --out OUT`")
    if not (args.out or args.out_dir):
        raise ConfigError("no output directory for the merged model", field="--out",
                          hint=f"add one: `tunekit merge {args.adapter} --out DIR`")
    return args.out or args.out_dir


def run(args: argparse.Namespace) -> int:
    from ..adapters.merge import merge_adapter
    from ._output import print_json

    result = merge_adapter(args.adapter, _out(args), base_model=args.base_model, dtype=args.dtype,
                           check_data=args.check_data, agreement_threshold=args.threshold,
                           overwrite=args.overwrite)
    if args.json:
        print_json(result.to_dict())
    else:
        verdict = "FLAGGED" if result.flagged else "ok"
        where = f"-> {result.out_dir}" if result.saved else f"(not saved to {result.out_dir}: not finite)"
        print(f"merged {result.adapter_path} into {result.base_model} {where} ({result.dtype})")
        print(f"merge check: top-1 agreement {result.top1_agreement:.4f}, max |logit diff| "
              f"{result.max_abs_diff:.4g} over {result.positions} positions: {verdict}")
        for note in result.notes:
            print(f"note: {note}")
    return 1 if result.flagged else 0
