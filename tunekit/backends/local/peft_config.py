"""TrainingSpec -> PEFT / bitsandbytes configs, as pure functions.

Nothing heavy is imported at module level: `plan` can call these without torch, and the configs
themselves are only built (lazily importing peft/transformers) when training starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..._exceptions import ConfigError
from . import variants as _variants


@dataclass(frozen=True)
class DeviceInfo:
    """What the trainer will run on. ``total_memory`` in bytes (GPU memory, or RAM on CPU)."""

    type: str  # "cuda" | "cpu"
    total_memory: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class QuantDecision:
    """Resolved quantization: ``mode`` is "nf4" or "none"; ``reason`` is shown by `plan`."""

    mode: str
    reason: str

    @property
    def quantized(self) -> bool:
        return self.mode == "nf4"


def lora_kwargs(spec: Any) -> dict[str, Any]:
    """The LoraConfig arguments for a spec (plain dict: testable and recordable without peft)."""
    a = spec.adapter
    return {
        "r": a.r,
        "lora_alpha": a.alpha,
        "lora_dropout": a.dropout,
        "target_modules": a.target_modules if a.target_modules == "all-linear" else list(a.target_modules),
        **_variants.of(a).peft_kwargs(),  # use_dora, use_rslora, init_lora_weights
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def resolve_quantization(spec: Any, device: DeviceInfo, bf16_fits: bool | None = None) -> QuantDecision:
    """Decide NF4 vs no quantization. ``bf16_fits`` comes from memory.estimate for 'auto' on a GPU."""
    q = spec.quantization
    if q == "nf4":
        return QuantDecision("nf4", "quantization='nf4' requested (QLoRA: NF4 + double quant, bf16 compute)")
    if q == "none":
        return QuantDecision("none", "quantization='none' requested")
    # auto
    if device.type != "cuda":
        return QuantDecision("none", "auto: no quantization on CPU (bitsandbytes 4-bit is for GPU memory savings)")
    if bf16_fits is None:
        return QuantDecision("nf4", "auto: model size unknown, so NF4 (QLoRA) to be safe")
    if bf16_fits:
        return QuantDecision("none", "auto: the bf16 model fits the device with room, so no quantization")
    return QuantDecision("nf4", "auto: the bf16 model would not fit the device, so NF4 (QLoRA)")


def quantization_config(quant: Any):
    """The BitsAndBytesConfig that loads the base of a run whose quantization was decided (``quant.quantized``,
    a QuantDecision or the run's Quantization), else None."""
    if not quant.quantized:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def check_combination(spec: Any, quant: QuantDecision | None = None) -> None:
    """Refuse combinations PEFT/TRL cannot train correctly, before any model is loaded (variants.py says which)."""
    _variants.of(spec.adapter).check(spec, quant.quantized if quant else None, quant.reason if quant else "")


_FIELD_PATTERNS = [
    (re.compile(r"target.?modules|not found in the base model", re.I), "adapter.target_modules"),
    (re.compile(r"dora", re.I), "adapter.use_dora"),
    (re.compile(r"pissa|olora|init_lora_weights|initiali[sz]", re.I), "adapter.init"),
    (re.compile(r"rslora", re.I), "adapter.use_rslora"),
    (re.compile(r"`?\br\b`?|rank", re.I), "adapter.r"),
    (re.compile(r"dropout", re.I), "adapter.dropout"),
]


def peft_error_to_config_error(exc: Exception) -> ConfigError:
    """Translate a PEFT ValueError/TypeError into a ConfigError naming the spec field it concerns."""
    msg = str(exc)
    field = next((f for pat, f in _FIELD_PATTERNS if pat.search(msg)), "adapter")
    return ConfigError(
        f"PEFT refused the adapter configuration ({field}): {msg}",
        field=field,
        hint=f"change {field} in the spec; `tunekit plan` shows the resolved adapter config",
    )
