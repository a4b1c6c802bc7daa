"""What an adapter directory is: the fields of ``adapter_config.json`` that decide where it can be used.

Reads the JSON only (no torch), so merge, export, eval and both serving engines refuse the same
adapters with the same message and next step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import AdapterNotFoundError, ConfigError

# Inits that rewrite the base weights while training; the saved adapter only fits the rewritten
# (residual) base unless it was converted to plain LoRA on save.
_MUTATING_INITS = ("pissa", "olora", "corda")


@dataclass(frozen=True)
class AdapterInfo:
    """The fields of ``adapter_config.json`` that decide where an adapter can be served (``raw``: all of it)."""

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
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def unconverted_init(self) -> str | None:
        """The init name if this is a PiSSA/OLoRA/CorDA adapter saved without conversion to plain LoRA."""
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
            return init
        return None


def read_adapter(path: str | os.PathLike[str]) -> AdapterInfo:
    """Parse ``path/adapter_config.json``; a ConfigError names the file when it is not a PEFT LoRA adapter."""
    path = Path(path).expanduser()
    cfg_path = path / "adapter_config.json"
    if not path.is_dir() or not cfg_path.is_file():
        error = AdapterNotFoundError if not path.exists() else ConfigError
        what = "does not exist" if not path.exists() else "has no adapter_config.json"
        raise error(
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
        raw=raw,
    )
