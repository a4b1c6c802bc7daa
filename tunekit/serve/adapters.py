"""Whether an engine can serve an adapter: the checks shared by vLLM, the embedded server and llama.cpp export.

What an adapter is (``adapter_config.json``) and where a reference points live in ``tunekit.adapters``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ..adapters.info import AdapterInfo


def same_base(a: str | None, b: str | None) -> bool:
    """Whether two base-model references name the same model (local paths compared resolved)."""
    if not a or not b:
        return True
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return False


# -- servability -------------------------------------------------------------------------------------

def _quoted(path: object) -> str:
    """The path as a shell word, so a hint's command runs as printed (a path may hold spaces)."""
    return shlex.quote(str(path))


def refuse_non_finite(info: AdapterInfo, *, name: str | None = None) -> None:
    """Raise a ConfigError for an adapter whose saved weights hold NaN or inf (every row decoded with it would
    get NaN logits) or cannot be read. Needs torch to read them; without it (a vLLM plan made elsewhere) the
    check is left to the serving host."""
    st = info.path / "adapter_model.safetensors"
    try:
        import torch
        from safetensors import SafetensorError, safe_open
    except ImportError:
        return
    if not st.is_file():
        return
    label = f"adapter {name!r} ({info.path})" if name else f"adapter {info.path}"
    try:
        f = safe_open(str(st), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{label}: cannot read {st.name} ({exc})", field="adapter",
                          hint="the adapter file is incomplete or damaged; re-save it") from exc
    with f:
        bad = _non_finite_keys(f)
    if bad:
        raise ConfigError(f"{label}: {bad[0]} holds NaN or infinite values", field="adapter",
                          hint="the training run diverged; serve an earlier checkpoint, or retrain with a "
                               "lower learning rate")


def non_finite_tensors(path: str | Path) -> list[str]:
    """Names of the tensors in a safetensors file that hold NaN or inf (the trainer's and the server's check)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return _non_finite_keys(f)


def _non_finite_keys(f: Any) -> list[str]:
    import torch

    return [key for key in f.keys() if not bool(torch.isfinite(f.get_tensor(key)).all())]


def refuse_unservable(info: AdapterInfo, *, engine: str, name: str | None = None, serves_dora: bool = False) -> None:
    """Raise a ConfigError for an adapter ``engine`` cannot serve as LoRA (checks shared by both engines)."""
    label = f"adapter {name!r} ({info.path})" if name else f"adapter {info.path}"
    if info.use_dora and not serves_dora:
        raise ConfigError(
            f"{label} uses DoRA, which {engine} cannot serve as a LoRA adapter",
            field="adapter.use_dora",
            hint="serve it with the embedded engine (`tunekit serve ... --engine embedded`), which serves DoRA "
                 f"unmerged, or merge it into the base (`tunekit merge {_quoted(info.path)} OUT_DIR`) and serve "
                 "OUT_DIR as a plain model")
    if info.modules_to_save:
        raise ConfigError(
            f"{label} also trains whole modules (modules_to_save={list(info.modules_to_save)}), "
            f"which {engine} cannot serve as a LoRA adapter",
            field="adapter.modules_to_save",
            hint=f"merge it (`tunekit merge {_quoted(info.path)} OUT_DIR`) and serve the merged model, "
                 "or retrain without modules_to_save")
    if info.unconverted_init:
        raise ConfigError(
            f"{label} was initialised with {info.unconverted_init!r} and saved unconverted: it only fits the "
            "residual base written during training, not the original base",
            field="adapter.init_lora_weights",
            hint="re-save it converted to plain LoRA with PEFT: "
                 "model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved before "
                 "training>) — the converted adapter has rank 2r and fits the original base")
    if info.bias != "none" or info.lora_bias:
        raise ConfigError(
            f"{label} trains biases (bias={info.bias!r}, lora_bias={info.lora_bias}); {engine} serves bias-free "
            "LoRA only", field="adapter.bias",
            hint=f"merge it (`tunekit merge {_quoted(info.path)} OUT_DIR`) and serve the merged model")
