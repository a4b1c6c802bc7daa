"""tunekit export ADAPTER|JOB --format gguf|ollama --out PATH [--merge] [--outtype f16|bf16|q8_0]."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export an adapter to GGUF (llama.cpp, LM Studio) or Ollama",
                       description="Write a LoRA adapter GGUF (llama.cpp --lora over the base's GGUF), or with "
                                   "--merge the whole merged model; --format ollama writes a folder with the "
                                   "GGUF file(s) and a Modelfile. Exit 1 when the --merge check is flagged.")
    p.add_argument("adapter", help="a job id, a registry adapter id/name, or an adapter directory")
    p.add_argument("--format", choices=["gguf", "ollama"], default="gguf")
    p.add_argument("--out", required=True, help="the .gguf file (gguf) or a new directory (ollama)")
    p.add_argument("--merge", action="store_true", help="merge into the 16-bit base and export the whole model")
    p.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], default="f16")
    p.add_argument("--base-model", help="default: the base recorded in adapter_config.json")
    p.add_argument("--base-gguf", help="ollama without --merge: an existing GGUF of the base to name in FROM "
                                       "(default: convert the base too)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_model
    from ._output import print_json

    result = export_model(args.adapter, args.out, format=args.format, merge=args.merge, outtype=args.outtype,
                          base_model=args.base_model, base_gguf=args.base_gguf, overwrite=args.overwrite)
    if args.json:
        print_json(result.to_dict())
    else:
        for role, path in result.files.items():
            print(f"{role}: {path}")
        if result.merge_check:
            mc = result.merge_check
            print(f"merge check: top-1 agreement {mc['top1_agreement']:.4f}: "
                  f"{'FLAGGED' if result.flagged else 'ok'}")
        for note in result.notes:
            print(f"note: {note}")
    return 1 if result.flagged else 0
