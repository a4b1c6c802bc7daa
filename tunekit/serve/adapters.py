"""What an adapter directory is, and whether an engine can serve it.

Reads ``adapter_config.json`` only (no torch): shared by ``tunekit merge``, the vLLM planner and the
embedded server, so every engine refuses the same adapters with the same message and next step.
An adapter reference is a directory or a key of the adapter registry (id, name or job id).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, JobNotFoundError

# Inits that rewrite the base weights while training; the saved adapter only fits the rewritten
# (residual) base unless it was converted to plain LoRA on save.
_MUTATING_INITS = ("pissa", "olora", "corda")


@dataclass(frozen=True)
class AdapterInfo:
    """The fields of ``adapter_config.json`` that decide where an adapter can be served."""

    path: Path
    base_model: str | None
    peft_type: str
    r: int
    max_rank: int  # r and every rank_pattern value
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    modules_to_save: tuple[str, ...]
    bias: str
    lora_bias: bool
    init_lora_weights: Any
    target_modules: Any
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def unconverted_init(self) -> str | None:
        """The init name if this is a PiSSA/OLoRA/CorDA adapter saved without conversion to plain LoRA."""
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
            return init
        return None


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_adapter(path: str | os.PathLike[str]) -> AdapterInfo:
    """Parse ``path/adapter_config.json``; a ConfigError names the file when it is not a PEFT LoRA adapter."""
    path = Path(path).expanduser()
    cfg_path = path / "adapter_config.json"
    if not path.is_dir() or not cfg_path.is_file():
        what = "does not exist" if not path.exists() else "has no adapter_config.json"
        raise ConfigError(
            f"{path} is not a PEFT adapter directory: it {what}",
            field="adapter",
            hint="pass the directory a training run saved (it holds adapter_config.json and adapter_model.safetensors), "
                 "or a registry id from `tunekit adapters list`",
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read adapter config: {exc}", field="adapter",
                          hint="the adapter was not saved completely; re-save it with save_pretrained") from exc
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ConfigError(
            f"{cfg_path}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters can be merged or served",
            field="adapter.peft_type", hint="train a LoRA adapter (tunekit's default)")
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"{path} has adapter_config.json but no adapter_model.safetensors", field="adapter",
                          hint="the adapter weights are missing; re-save the adapter")
    r = int(raw.get("r") or 8)
    ranks = [r, *(int(v) for v in (raw.get("rank_pattern") or {}).values())]
    mts = raw.get("modules_to_save") or ()
    return AdapterInfo(
        path=path,
        base_model=raw.get("base_model_name_or_path") or None,
        peft_type=peft_type,
        r=r,
        max_rank=max(ranks),
        lora_alpha=float(raw.get("lora_alpha") or r),
        use_rslora=bool(raw.get("use_rslora")),
        use_dora=bool(raw.get("use_dora")),
        modules_to_save=tuple(mts),
        bias=str(raw.get("bias") or "none"),
        lora_bias=bool(raw.get("lora_bias")),
        init_lora_weights=raw.get("init_lora_weights", True),
        target_modules=raw.get("target_modules"),
        raw=raw,
    )


def resolve_adapter(ref: str | os.PathLike[str]) -> tuple[Path, Any]:
    """An adapter directory for ``ref`` (a path, or a registry id/name/job id) and its registry record or None."""
    path = Path(ref).expanduser()
    if path.exists():
        return path, None
    try:
        from ..store import default_store

        record = default_store().get_adapter(str(ref))
    except JobNotFoundError:
        raise ConfigError(
            f"{ref!s} is neither an adapter directory nor an adapter in the registry", field="adapter",
            hint="pass the adapter directory, or an id/name from `tunekit adapters list`") from None
    location = Path(record.location).expanduser()
    if not location.exists():
        raise ConfigError(
            f"registry adapter {record.id} points to {location}, which is not on this machine "
            f"(backend {record.backend!r})", field="adapter",
            hint="managed-backend adapters live at the provider; download the adapter or serve it there")
    return location, record


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
