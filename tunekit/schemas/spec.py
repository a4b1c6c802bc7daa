"""TrainingSpec: the one description of a fine-tune that every backend plans from.

Only the fields a user *set* count (pydantic's ``model_fields_set``, recursively): a backend maps,
transforms or refuses each of them, and defaults are the backend's own business.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Hyperparameters(_Strict):
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training data.")
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per optimizer step (global).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Absolute peak learning rate.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, ge=16, description="Tokens per example; longer ones are truncated and counted.")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    dpo_beta: float = Field(0.1, gt=0, le=2, description="DPO temperature (method='dpo' only).")


class AdapterConfig(_Strict):
    r: int = Field(32, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(64, gt=0, description="LoRA scaling numerator (alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "pissa_fast", "olora"] = Field(
        "default", description="Adapter initialisation; 'pissa_fast' uses randomized SVD (PEFT pissa_niter_16)."
    )
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: learning-rate ratio of B to A (e.g. 16).")


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
