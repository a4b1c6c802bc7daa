"""tunekit serve BASE --adapter NAME=PATH ...: an OpenAI-compatible server (embedded engine or vLLM)."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a base model and LoRA adapters on an OpenAI-compatible API",
                       description="Adapters are NAME=PATH pairs (PATH: an adapter directory or a registry "
                                   "id/name from `tunekit adapters list`). The API key can also come from "
                                   "TUNEKIT_SERVE_API_KEY (keeps it out of the process list).")
    p.add_argument("base_model", help="the base model (hub id or local directory), or a job id / registry "
                                      "adapter to serve that one adapter over its own base")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    p.add_argument("--engine", choices=["embedded", "vllm"], help="default: vllm if installed with a GPU")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="bearer token clients must send")
    p.add_argument("--max-loras", type=int, help="adapters resident at once (embedded default 4; vLLM: one "
                                                 "per adapter given)")
    p.add_argument("--max-lora-rank", type=int, help="vLLM: default is the smallest allowed rank covering all")
    p.add_argument("--allow-base-mismatch", action="store_true", help="vLLM: serve adapters trained on "
                                                                      "another base name")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `vllm serve` (repeatable), e.g. --vllm-arg=--max-model-len=8192")
    p.add_argument("--device", help="embedded: cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="embedded: default bf16 on GPU, fp32 on CPU")
    p.add_argument("--allowed-adapter-dir", action="append", default=[], metavar="DIR",
                   help="embedded: runtime loads may also use adapters under DIR (repeatable)")
    p.add_argument("--dry-run", "--plan", dest="dry_run", action="store_true",
                   help="check the adapters and print the exact plan (vLLM: the command); start nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.set_defaults(func=serve_run)


def _adapters(pairs: list[str]) -> dict[str, str]:
    from .._exceptions import ConfigError

    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {pair!r} is not NAME=PATH", field="--adapter",
                              hint="e.g. --adapter sql=runs/sql/adapter")
        if name in out:
            raise ConfigError(f"--adapter name {name!r} given twice", field="--adapter")
        out[name] = path
    return out


def _single_adapter(ref: str) -> tuple[str, dict[str, str]] | None:
    """`tunekit serve JOB`: a job id, registry entry or adapter directory means that adapter over the base it
    was trained on; None when ``ref`` may name a base model. A path or id that names no adapter raises."""
    from .._exceptions import ConfigError
    from ..adapters.info import read_adapter
    from ..adapters.resolve import locate, may_name_a_model

    if may_name_a_model(ref):
        return None
    found = locate(ref)
    if found.record is not None:
        base, name, key = found.record.base_model, found.record.job_id or found.record.id, found.record.id
    else:
        base, name, key = read_adapter(found.path).base_model, found.path.name, str(found.path)
    if not base:
        raise ConfigError(f"adapter {ref} does not name its base model", field="base_model",
                          hint=f"name the base: `tunekit serve BASE --adapter {name}={ref}`")
    return base, {name: key}


def _require_embedded_extras() -> None:
    """The embedded server needs the [serve] extra (FastAPI, uvicorn) and the [local] one (torch, transformers)."""
    import importlib.util

    from .._exceptions import MissingDependencyError

    missing = [m for m in ("fastapi", "uvicorn", "torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"the embedded server needs {', '.join(missing)}, which is not installed",
                                     hint="pip install 'tunekit[local,serve]'")


def serve_run(args: argparse.Namespace) -> int:
    from .._exceptions import ConfigError
    from ..serve import pick_engine
    from ._output import print_json

    adapters = _adapters(args.adapter)
    single = _single_adapter(args.base_model)
    if single is not None:
        if adapters:
            raise ConfigError(f"{args.base_model} is an adapter, not a base model", field="base_model",
                              hint="give the base model first (`tunekit serve BASE --adapter NAME=ADAPTER ...`), "
                                   f"or serve this adapter alone over its base: `tunekit serve {args.base_model}`")
        args.base_model, adapters = single
    api_key = args.api_key or os.environ.get("TUNEKIT_SERVE_API_KEY") or None
    engine = pick_engine(args.engine)
    if engine == "vllm":
        from ..serve.vllm import launch, plan_vllm

        plan = plan_vllm(args.base_model, adapters, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                         port=args.port, host=args.host, api_key=api_key, extra_args=args.vllm_arg,
                         allow_base_mismatch=args.allow_base_mismatch)
        if args.dry_run:
            if args.json:
                print_json(plan.to_dict())
            else:
                print(plan.command_line())
                for key, why in plan.reasons.items():
                    print(f"  {key}: {why}")
            for w in plan.warnings:
                print(f"warning: {w}")
            return 0
        for w in plan.warnings:
            print(f"warning: {w}")
        print(f"starting: {plan.command_line()}", flush=True)
        with launch(plan) as server:
            print(f"serving on {server.url}/v1 (log: {server.log_path}); Ctrl-C to stop", flush=True)
            return server.wait()
    _require_embedded_extras()  # a dry run that says "would serve" must not fail when run for real
    if args.dry_run:  # embedded: check every adapter without loading the base model
        from ..adapters.info import read_adapter
        from ..adapters.resolve import resolve_adapter
        from ..serve.adapters import refuse_non_finite, refuse_unservable

        checked = {}
        for name, ref in adapters.items():
            info = read_adapter(resolve_adapter(ref)[0])
            refuse_unservable(info, engine="the embedded server", name=name, serves_dora=True)
            refuse_non_finite(info, name=name)
            checked[name] = {"path": str(info.path), "r": info.max_rank, "base_model": info.base_model}
        result = {"engine": "embedded", "base_model": args.base_model, "adapters": checked,
                  "url": f"http://{args.host}:{args.port}/v1"}
        if args.json:
            print_json(result)
        else:
            for name, c in checked.items():
                print(f"{name}: {c['path']} (r={c['r']}, base {c['base_model']})")
            print(f"would serve on {result['url']}")
        return 0
    from ..serve.embedded.server import run

    run(args.base_model, adapters, host=args.host, port=args.port, api_key=api_key,
        max_loras=args.max_loras or 4, device=args.device, dtype=args.dtype,
        allowed_adapter_dirs=tuple(args.allowed_adapter_dir))
    return 0
