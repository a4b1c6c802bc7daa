"""TrainingSpec -> keyword arguments of ``together.Together().fine_tuning.create`` (SDK 3.x), and Together's
job statuses -> JobStatus. Pure data and small functions: no SDK import.

The plan's request is the SDK call's keyword arguments (``lora_r``, ``n_epochs``, ``lr_scheduler_type``, ...);
the SDK turns them into the JSON body (``training_type``/``training_method``/``lr_scheduler`` objects) and
adds its own defaults for what is not given (1 epoch, lr 1e-5, cosine, batch "max", the model's LoRA rank).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ...catalog import resolve_model
from ...schemas.job import JobStatus
from ...schemas.spec import TrainingSpec
from ..base import FieldRule, PlanContext, Refuse, Send

PROVIDER = "together"

# -- the tunekit tag ------------------------------------------------------------------------------------
# Together has no job metadata; the suffix (part of the output model name) is the only free field we can
# list by. The SDK documents "up to 40 character suffix"; tunekit appends "-<job id>" (16 characters for
# "tk-" + 12 hex), so a user suffix may use the remaining 24.
SUFFIX_MAX = 40
TAG_SEPARATOR = "-"
USER_SUFFIX_MAX = SUFFIX_MAX - len(TAG_SEPARATOR) - len("tk-") - 12


def tagged_suffix(user_suffix: str | None, job_id: str) -> str:
    """The suffix sent to Together: the user's suffix (if any) + '-' + the tunekit job id."""
    suffix = f"{user_suffix}{TAG_SEPARATOR}{job_id}" if user_suffix else job_id
    if len(suffix) > SUFFIX_MAX:  # a job id longer than tunekit makes, or a suffix the plan did not check
        from ..._exceptions import ConfigError

        raise ConfigError(f"Together suffix {suffix!r} is {len(suffix)} characters; Together takes {SUFFIX_MAX}",
                          field="suffix", hint=f"use a suffix of at most {USER_SUFFIX_MAX} characters")
    return suffix


_TAG = re.compile(r"(tk-[0-9a-f]{12})$")


def tag_of(item: dict[str, Any]) -> str | None:
    """The tunekit job id a listed Together job carries at the end of its suffix, if any."""
    found = _TAG.search(str(item.get("suffix") or "").lower())
    return found.group(1) if found else None


def carries_tag(item: dict[str, Any], job_id: str) -> bool:
    """Does a listed Together job carry this tunekit job id (in its suffix or output model name)?"""
    tag = job_id.lower()
    suffix = str(item.get("suffix") or "").lower()
    output = str(item.get("model_output_name") or "").lower()
    return suffix.endswith(tag) or tag in output


# -- statuses -----------------------------------------------------------------------------------------------
# Spec enum + "user_error" (SDK 3.1.1 only). Terminal as in the SDK's COMPLETED_STATUSES. "compressing" and
# "uploading" come after training (the model is packed and stored): still running, not done.
STATUS_MAP: dict[str, JobStatus] = {
    "pending": JobStatus.QUEUED,
    "queued": JobStatus.QUEUED,
    "running": JobStatus.RUNNING,
    "compressing": JobStatus.RUNNING,
    "uploading": JobStatus.RUNNING,
    "cancel_requested": JobStatus.CANCELLING,
    "cancelled": JobStatus.CANCELLED,
    "error": JobStatus.FAILED,
    "user_error": JobStatus.FAILED,
    "completed": JobStatus.SUCCEEDED,
}

# An eval every 10% of training when validation data is given, as the local backend does (Together's
# default n_evals is 0: the validation file would be uploaded and never used).
DEFAULT_N_EVALS = 10

# -- provider options: SDK create() arguments tunekit's spec has no field for --------------------------------
Count = Annotated[int, Field(ge=0)]


class TogetherOptions(BaseModel):
    """``provider_options={"together": {...}}``: keyword arguments of ``fine_tuning.create`` (types as the SDK's
    signature). Secrets are not options (the spec and the plan are stored): the W&B key is read from
    WANDB_API_KEY at submit."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    n_checkpoints: Optional[Annotated[int, Field(ge=1)]] = Field(None, description="checkpoints kept, >= 1")
    n_evals: Optional[Count] = Field(None, description=f"evaluations on the validation file, >= 0 (default "
                                                       f"{DEFAULT_N_EVALS} with validation_data)")
    packing: Optional[bool] = Field(None, description="pack several examples per sequence (Together's default: true)")
    train_on_inputs: Optional[Union[bool, Literal["auto"]]] = Field(
        None, description="true, false or 'auto' (tunekit sends false for SFT: train on the answers)")
    min_lr_ratio: Optional[Annotated[float, Field(ge=0, le=1)]] = Field(
        None, description="final learning rate as a fraction of the peak, in [0, 1]")
    scheduler_num_cycles: Optional[Annotated[float, Field(gt=0)]] = Field(
        None, description="cosine cycles, > 0 (Together's default 0.5)")
    dpo_normalize_logratios_by_length: Optional[bool] = Field(None, description="DPO: length-normalised log-ratios")
    rpo_alpha: Optional[float] = Field(None, description="DPO: weight of the RPO (NLL) term")
    simpo_gamma: Optional[float] = Field(None, description="DPO: SimPO margin")
    train_vision: Optional[bool] = Field(None, description="also train the vision tower (vision models)")
    early_stopping_enabled: Optional[bool] = Field(None, description="stop when the validation loss stops improving")
    early_stopping_patience: Optional[Annotated[int, Field(ge=1)]] = Field(None, description="evaluations to wait, >= 1")
    early_stopping_min_delta: Optional[Annotated[float, Field(ge=0)]] = Field(
        None, description="smallest loss decrease that counts, >= 0")
    early_stopping_warmup_evals: Optional[Count] = Field(None, description="evaluations before stopping may start")
    wandb_project_name: Optional[str] = Field(None, description="W&B project (needs WANDB_API_KEY)")
    wandb_name: Optional[str] = Field(None, description="W&B run name (needs WANDB_API_KEY)")
    wandb_entity: Optional[str] = Field(None, description="W&B entity (needs WANDB_API_KEY)")
    wandb_base_url: Optional[str] = Field(None, description="W&B server URL (needs WANDB_API_KEY)")


WANDB_OPTIONS = tuple(name for name in TogetherOptions.model_fields if name.startswith("wandb_"))


# -- conversions ----------------------------------------------------------------------------------------------
def _model_rule(spec: TrainingSpec) -> FieldRule:
    resolved = resolve_model(spec.base_model, PROVIDER)  # raises UnknownModelError for another backend's name
    if resolved == spec.base_model:
        return Send("model", note="Together model id (not in the catalog: passed through)")
    return Send("model", convert=lambda v, ctx: resolve_model(v, PROVIDER), note="catalog name -> Together id")


def _batch_rule(spec: TrainingSpec) -> FieldRule:
    hp = spec.hyperparameters
    ga = hp.gradient_accumulation_steps
    if "gradient_accumulation_steps" not in hp.model_fields_set or ga == 1:
        return Send("batch_size", note="examples per step; Together packs sequences, so the effective batch may differ")
    if hp.batch_size % ga:
        return Refuse(f"batch_size ({hp.batch_size}) must be a multiple of gradient_accumulation_steps ({ga}): "
                      "tunekit's batch_size is the global batch")
    return Send("batch_size", convert=lambda v, ctx: v // ga,
                note=f"Together's batch_size is per accumulation step (effective = batch_size x {ga})")


def _scheduler_rule(spec: TrainingSpec) -> FieldRule:
    if spec.hyperparameters.lr_scheduler == "constant":
        return Send("lr_scheduler_type", convert=lambda v, ctx: "linear",
                    note="Together has linear and cosine only: linear decaying to min_lr_ratio=1.0 keeps the "
                         "rate constant after warmup")
    return Send("lr_scheduler_type")


def _alpha_rule(spec: TrainingSpec) -> FieldRule:
    alpha = spec.adapter.alpha
    if float(alpha).is_integer():
        return Send("lora_alpha", convert=lambda v, ctx: int(v), note="Together takes an integer alpha")
    return Refuse(f"Together takes an integer lora_alpha; {alpha} would be truncated")


def _modules(value: Any, ctx: PlanContext) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _modules_rule(spec: TrainingSpec) -> FieldRule:
    if spec.adapter.target_modules == "all-linear":
        return Send("lora_trainable_modules")
    return Send("lora_trainable_modules", convert=_modules, note="Together takes a comma-separated string")


def _dpo_beta_rule(spec: TrainingSpec) -> FieldRule:
    if spec.method == "dpo":
        return Send("dpo_beta")
    return Refuse("dpo_beta applies to method='dpo' only")


def _suffix_rule(spec: TrainingSpec) -> FieldRule:
    if spec.suffix is not None and len(spec.suffix) > USER_SUFFIX_MAX:
        return Refuse(f"Together caps the suffix at {SUFFIX_MAX} characters and tunekit appends '-<job id>' "
                      f"(16) to find the job again: use at most {USER_SUFFIX_MAX} characters")
    return Send("suffix", note="tunekit appends '-<job id>' at submit (the tag reconcile lists by)")


def _flag_rule(field: str, default: Any, reason: str, same: str) -> FieldRule:
    """A feature Together does not offer: its 'off' value is honoured, anything else refused."""
    def rule(spec: TrainingSpec) -> FieldRule:
        section, name = field.split(".")
        if getattr(getattr(spec, section), name) == default:
            return Send(None, note=same)
        return Refuse(reason)
    return rule


def _quantization_rule(spec: TrainingSpec) -> FieldRule:
    if spec.quantization == "nf4":
        return Refuse("Together trains LoRA on its own 16-bit weights; QLoRA (nf4) is not offered")
    return Send(None, note="Together chooses the training precision itself (16-bit LoRA)")


def _file_placeholder(value: Any, ctx: PlanContext) -> str:
    from pathlib import Path

    return f"<file id of {Path(str(value)).name}, uploaded at submit>"


FIELD_MAP: dict[str, FieldRule] = {
    "base_model": _model_rule,
    "method": Send("training_method"),
    "validation_data": Send("validation_file", convert=_file_placeholder,
                            note=f"uploaded like the training file; n_evals={DEFAULT_N_EVALS} unless "
                                 "provider_options.together.n_evals is given"),
    "suffix": _suffix_rule,
    "quantization": _quantization_rule,
    # hyperparameters
    "hyperparameters.epochs": Send("n_epochs"),
    "hyperparameters.batch_size": _batch_rule,
    "hyperparameters.learning_rate": Send("learning_rate", note="absolute, as in tunekit"),
    "hyperparameters.warmup_ratio": Send("warmup_ratio"),
    "hyperparameters.lr_scheduler": _scheduler_rule,
    "hyperparameters.weight_decay": Send("weight_decay"),
    "hyperparameters.max_grad_norm": Send("max_grad_norm"),
    "hyperparameters.gradient_accumulation_steps": Send(
        "gradient_accumulation_steps", note="SDK-only field (not in the public OpenAPI spec)"),
    "hyperparameters.max_length": Send("max_seq_length"),
    "hyperparameters.seed": Send("random_seed"),
    "hyperparameters.dpo_beta": _dpo_beta_rule,
    # adapter
    "adapter.r": Send("lora_r"),
    "adapter.alpha": _alpha_rule,
    "adapter.dropout": Send("lora_dropout"),
    "adapter.target_modules": _modules_rule,
    "adapter.use_dora": _flag_rule("adapter.use_dora", False, "Together trains plain LoRA; DoRA is not offered",
                                   "plain LoRA is what Together trains"),
    "adapter.use_rslora": _flag_rule("adapter.use_rslora", False,
                                     "Together scales LoRA by alpha / r; rsLoRA is not offered",
                                     "alpha / r scaling is what Together uses"),
    "adapter.init": _flag_rule("adapter.init", "default", "Together does not expose the adapter initialisation",
                               "Together uses the standard LoRA initialisation"),
    "adapter.loraplus_lr_ratio": _flag_rule("adapter.loraplus_lr_ratio", None,
                                            "Together does not offer LoRA+ learning-rate ratios",
                                            "no LoRA+ ratio: one learning rate, as Together trains"),
}


def base_request(spec: TrainingSpec) -> dict[str, Any]:
    """What every request carries before the user's fields: LoRA on, and the choices tunekit makes for
    the user where Together's default differs from tunekit's meaning."""
    request: dict[str, Any] = {"lora": True}
    if spec.method == "sft":
        # Train on the outputs only (assistant turns / completions), tunekit's meaning for every row kind.
        # Together's "auto" does the same for these formats, but the spec types train_on_inputs as boolean.
        request["train_on_inputs"] = False
    if "lr_scheduler" in spec.hyperparameters.model_fields_set and spec.hyperparameters.lr_scheduler == "constant":
        request["min_lr_ratio"] = 1.0
    if spec.validation_data:
        request["n_evals"] = DEFAULT_N_EVALS
    return request


def plan_notes(spec: TrainingSpec) -> list[str]:
    notes = [
        "request = keyword arguments of together's client.fine_tuning.create (the SDK builds the JSON body); "
        "training_file/validation_file ids are added after the upload",
        "fields you did not set take Together's defaults: 1 epoch, learning rate 1e-5, cosine schedule, "
        "batch_size 'max', LoRA rank = the model's default rank, alpha = 2 x rank",
        f"the suffix sent is '<your suffix>-<tunekit job id>' (Together caps it at {SUFFIX_MAX} characters)",
    ]
    if spec.method == "sft":
        notes.append("prompt/response rows are uploaded as Together's prompt/completion format (no chat template); "
                     "chat rows as conversational rows")
    return notes


def check_limits(request: dict[str, Any], limits: Any, method: str) -> None:
    """Check the request against Together's model limits (GET /fine-tunes/models/limits) before the paid
    create, naming the tunekit field. The SDK checks some of these too, but without field names."""
    from ..._exceptions import ConfigError

    def bad(field: str, msg: str) -> ConfigError:
        return ConfigError(f"together: {msg} for {request.get('model')}", field=field,
                           hint="see `together fine-tuning models` or the model's limits, and change the field")

    lora = getattr(limits, "lora_training", None)
    r = request.get("lora_r")
    if lora is not None and r is not None and lora.max_rank and r > lora.max_rank:
        raise bad("adapter.r", f"LoRA rank {r} is above the maximum {lora.max_rank}")
    modules = request.get("lora_trainable_modules")
    if lora is not None and modules and modules != "all-linear" and lora.target_modules:
        unknown = [m for m in modules.split(",") if m not in lora.target_modules]
        if unknown:
            raise bad("adapter.target_modules",
                      f"modules {unknown} not trainable; choose from {', '.join(lora.target_modules)}")
    batch = request.get("batch_size")
    if lora is not None and isinstance(batch, int):
        top = lora.max_batch_size_dpo if method == "dpo" else lora.max_batch_size
        if (top and batch > top) or batch < (lora.min_batch_size or 0):
            raise bad("hyperparameters.batch_size",
                      f"batch_size {batch} outside {lora.min_batch_size}..{top} ({method})")
    epochs = request.get("n_epochs")
    if epochs is not None and getattr(limits, "max_num_epochs", None) and epochs > limits.max_num_epochs:
        raise bad("hyperparameters.epochs", f"{epochs} epochs is above the maximum {limits.max_num_epochs}")
    lr = request.get("learning_rate")
    lo, hi = getattr(limits, "min_learning_rate", None), getattr(limits, "max_learning_rate", None)
    if lr is not None and lo is not None and hi and not lo <= lr <= hi:
        raise bad("hyperparameters.learning_rate", f"learning rate {lr} outside {lo}..{hi}")
    seq = request.get("max_seq_length")
    top_seq = getattr(limits, "max_seq_length_dpo" if method == "dpo" else "max_seq_length_sft", None)
    low_seq = getattr(limits, "min_max_seq_length", None)
    if seq is not None and ((top_seq and seq > top_seq) or (low_seq and seq < low_seq)):
        raise bad("hyperparameters.max_length", f"max_length {seq} outside {low_seq}..{top_seq} ({method})")
