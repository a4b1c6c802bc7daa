"""TrainingSpec: the one description of a fine-tune that every backend plans from.

Only the fields a user *set* count (pydantic's ``model_fields_set``, recursively): a backend maps,
transforms or refuses each of them, and defaults are the backend's own business.

Every number is finite and bounded (docs/spec.md lists the ranges): an infinite alpha or a huge
weight decay trains on NaN gradients, and a huge max_length makes planning and training cost
unbounded. ``field_range`` renders a field's bounds for error messages.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union, get_args

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Longest example a spec may ask for, in tokens (2**20: beyond the longest contexts models train at).
MAX_LENGTH_LIMIT = 2**20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: Any) -> Any:
        # pydantic's lax mode reads True as 1: `--set hyperparameters.epochs=true` is a mistake, not one epoch
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{value!r} is not a number")
        return value


class Hyperparameters(_Strict):
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training data.")
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per optimizer step (global).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Absolute peak learning rate.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW's decoupled weight decay (usually 0-0.1).")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm (large = no clipping).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, ge=16, le=MAX_LENGTH_LIMIT,
                            description="Tokens per example; longer ones are truncated and counted.")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    dpo_beta: float = Field(0.1, gt=0, le=2, description="DPO temperature (method='dpo' only).")


class AdapterConfig(_Strict):
    r: int = Field(32, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(64, gt=0, le=16384, description="LoRA scaling numerator (alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "pissa_fast", "olora"] = Field(
        "default", description="Adapter initialisation; 'pissa_fast' uses randomized SVD (PEFT pissa_niter_16)."
    )
    loraplus_lr_ratio: float | None = Field(None, gt=0, le=1024, description="LoRA+: learning-rate ratio of B to A (e.g. 16).")


class TrainingSpec(_Strict):
    """What to train. Backend-independent; `backend.plan(spec)` says how each set field is honoured."""

    base_model: str = Field(..., min_length=1, description="Canonical name, provider id, HF id or local path.")
    method: Literal["sft", "dpo"] = "sft"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quantization: Literal["none", "nf4", "auto"] = Field(
        "auto", description="'nf4' = QLoRA (NF4 + double quant); 'auto' picks bf16 when it fits, else nf4."
    )
    validation_data: str | None = Field(None, description="Path of a validation JSONL file (same row kind).")
    suffix: str | None = Field(None, min_length=1, max_length=64, description="Name suffix of the output model.")
    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-backend extras, keyed by backend name: {'together': {...}}."
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainingSpec":
        if isinstance(self.adapter.target_modules, list) and not self.adapter.target_modules:
            raise ValueError("adapter.target_modules: give module names or 'all-linear'")
        return self

    @field_validator("provider_options")
    @classmethod
    def _finite_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for backend, opts in value.items():
            for key, v in (opts or {}).items():
                if _non_finite(v):  # passed through to SDKs and the worker as is: refuse here
                    raise ValueError(f"provider_options.{backend}.{key} holds {v!r}: give a finite number")
        return value

    def set_fields(self) -> dict[str, Any]:
        """Dotted path -> value of every field the user set (nested models included)."""
        return _set_fields(self, "")


def _set_fields(model: BaseModel, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(_set_fields(value, path + "."))
        elif name == "provider_options":
            for backend, opts in value.items():
                for key, v in (opts or {}).items():
                    out[f"provider_options.{backend}.{key}"] = v
        else:
            out[path] = value
    return dict(sorted(out.items()))


def spec_leaf_fields() -> list[str]:
    """Every leaf field path of the spec (for the 'every field has a decision' test)."""
    paths: list[str] = []
    for name, info in TrainingSpec.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += [f"{name}.{sub}" for sub in ann.model_fields]
        elif name != "provider_options":
            paths.append(name)
    return sorted(paths)


def _non_finite(value: Any) -> bool:
    """True when a (possibly nested) JSON-like value holds an infinite or NaN float."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


def field_range(path: str) -> Optional[str]:
    """The bounds of a numeric spec field as text, e.g. '0 < value <= 16384' (None when unbounded)."""
    model: Any = TrainingSpec
    info = None
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    if info is None:
        return None
    low = high = ""
    for m in info.metadata:
        if isinstance(m, Ge):
            low = f"{_num(m.ge)} <= "
        elif isinstance(m, Gt):
            low = f"{_num(m.gt)} < "
        elif isinstance(m, Le):
            high = f" <= {_num(m.le)}"
        elif isinstance(m, Lt):
            high = f" < {_num(m.lt)}"
    return f"{low}value{high}" if low or high else None


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
