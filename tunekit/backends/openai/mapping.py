"""OpenAI: every TrainingSpec field mapped, transformed or refused; every job status mapped.

Pure data and small functions (no SDK import), so ``tunekit plan --backend openai`` stays cheap.
The request is the keyword arguments of ``client.fine_tuning.jobs.create`` (= the JSON body of
``POST /v1/fine_tuning/jobs``). Hyperparameters go under ``method.<type>.hyperparameters`` (the top-level
``hyperparameters`` object is deprecated in the spec). Sources: openai 3.57.0
(``types/fine_tuning/job_create_params.py``), the OpenAPI spec (``CreateFineTuningJobRequest``,
``FineTuneSupervisedHyperparameters``, ``FineTuneDPOHyperparameters``) and docs/backends/openai.md.

OpenAI exposes no LoRA settings, no warmup, no scheduler and no absolute learning rate: it does not say
how it fine-tunes. Each such field is refused with its own reason, never dropped silently.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat
from pydantic_core import PydanticCustomError

from ...catalog import resolve_model
from ...schemas.job import JobStatus
from ...schemas.spec import TrainingSpec
from ..base import PlanContext, Refuse, Rule, Send

# OpenAI stops accepting NEW fine-tuning jobs on this day (UTC); existing jobs and models keep working.
SHUTDOWN_DATE = _dt.date(2027, 1, 6)

TAG_KEY = "tunekit_job_id"                # metadata key that tags every job with its tunekit id
TRAINING_FILE = "<file id of the uploaded training data>"     # placeholders: create_kwargs fills them in
VALIDATION_FILE = "<file id of the uploaded validation data>"

MAX_EPOCHS = 50                           # spec: n_epochs integer 1..50
MAX_BATCH = 256                           # spec: batch_size integer 1..256
MAX_METADATA_PAIRS = 16                   # spec: Metadata, at most 16 pairs

NO_LORA = "OpenAI does not expose how it fine-tunes (its API has no LoRA settings)"


def method_type(spec: TrainingSpec) -> str:
    return "dpo" if spec.method == "dpo" else "supervised"


def hp(name: str):
    """Target of a hyperparameter: ``method.supervised.hyperparameters.<name>`` or ``method.dpo...``."""
    return lambda spec: f"method.{method_type(spec)}.hyperparameters.{name}"


# -- conversions ------------------------------------------------------------------------------------------

def to_model(value: str, ctx: PlanContext) -> str:
    """Canonical name -> OpenAI snapshot id (``gpt-4o-mini`` -> ``gpt-4o-mini-2024-07-18``); ids pass."""
    return resolve_model(value, "openai")


def to_method_type(value: str, ctx: PlanContext) -> str:
    return "dpo" if value == "dpo" else "supervised"


def _bounded(field: str, low: int, high: int):
    def rule(spec: TrainingSpec) -> Rule:
        value = getattr(spec.hyperparameters, field)
        if not low <= value <= high:
            return Refuse(f"OpenAI accepts {low}..{high}, got {value}")
        return Send(hp({"epochs": "n_epochs", "batch_size": "batch_size"}[field]))
    return rule


def dpo_beta(spec: TrainingSpec) -> Rule:
    if spec.method != "dpo":
        return Refuse("dpo_beta applies only to method='dpo'")
    return Send("method.dpo.hyperparameters.beta")  # spec: number in (0, 2]; TrainingSpec has the same bounds


def _user_metadata(value: dict[str, str]) -> dict[str, str]:
    # PydanticCustomError: the message reads as is ("refused: it must ..."), without "Value error, "
    if TAG_KEY in value:
        raise PydanticCustomError("reserved_key", f"must not hold {TAG_KEY!r}: tunekit sets it (it tags the job)")
    if len(value) > MAX_METADATA_PAIRS - 1:
        raise PydanticCustomError("too_many_pairs", f"must have at most {MAX_METADATA_PAIRS - 1} pairs (OpenAI "
                                                    f"allows {MAX_METADATA_PAIRS}; tunekit uses one)")
    return value


class OpenAIOptions(BaseModel):
    """``provider_options={"openai": {...}}``: create arguments the spec has no field for (docs/backends/openai.md)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    learning_rate_multiplier: Optional[PositiveFloat] = Field(
        None, description="a number > 0 on OpenAI's per-model base rate: 0.5 halves it, 2 doubles it "
                          "(unset: OpenAI's 'auto'); sent under method.<type>.hyperparameters")
    metadata: Optional[Annotated[dict[str, str], AfterValidator(_user_metadata)]] = Field(
        None, description=f"extra string pairs on the job, at most {MAX_METADATA_PAIRS - 1}, merged with "
                          f"{{{TAG_KEY!r}: <job id>}}")
    integrations: Optional[list[dict[str, Any]]] = Field(
        None, description="e.g. [{'type': 'wandb', 'wandb': {'project': 'p'}}]")


# Options sent somewhere else than a top-level key of their own name.
OPTION_TARGETS = {"learning_rate_multiplier": hp("learning_rate_multiplier")}


LR_REASON = (
    "OpenAI takes only learning_rate_multiplier, a factor on a per-model base rate it does not publish, "
    "so an absolute rate has no faithful conversion; set provider_options.openai.learning_rate_multiplier "
    "instead (unset = OpenAI's 'auto')"
)

# Every leaf of TrainingSpec (tests check this against spec_leaf_fields()).
FIELD_MAP: dict[str, Any] = {
    "base_model": Send("model", convert=to_model, note="catalog name -> OpenAI model id"),
    "method": Send("method.type", convert=to_method_type, note="sft -> supervised, dpo -> dpo"),
    "suffix": Send("suffix"),
    "validation_data": Send("validation_file", convert=lambda v, ctx: VALIDATION_FILE,
                            note="uploaded with purpose=fine-tune on submit; its file id is sent"),
    "quantization": Refuse("OpenAI trains on its own infrastructure; quantization is not selectable"),
    "hyperparameters.epochs": _bounded("epochs", 1, MAX_EPOCHS),
    "hyperparameters.batch_size": _bounded("batch_size", 1, MAX_BATCH),
    "hyperparameters.learning_rate": Refuse(LR_REASON),
    "hyperparameters.seed": Send("seed"),
    "hyperparameters.dpo_beta": dpo_beta,
    "hyperparameters.warmup_ratio": Refuse("OpenAI's API has no warmup setting"),
    "hyperparameters.lr_scheduler": Refuse("OpenAI's API has no learning-rate scheduler setting"),
    "hyperparameters.weight_decay": Refuse("OpenAI's API has no weight-decay setting"),
    "hyperparameters.max_grad_norm": Refuse("OpenAI's API has no gradient-clipping setting"),
    "hyperparameters.gradient_accumulation_steps": Refuse(
        "OpenAI decides how a batch is computed; batch_size (examples per step) is the only batch setting"),
    "hyperparameters.max_length": Refuse(
        "OpenAI sets the per-example token limit per model (longer examples are truncated); it is not settable"),
    "adapter.r": Refuse(f"{NO_LORA}: the rank cannot be set"),
    "adapter.alpha": Refuse(f"{NO_LORA}: alpha cannot be set"),
    "adapter.dropout": Refuse(f"{NO_LORA}: dropout cannot be set"),
    "adapter.target_modules": Refuse(f"{NO_LORA}: target modules cannot be chosen"),
    "adapter.use_dora": Refuse(f"{NO_LORA}: DoRA cannot be requested"),
    "adapter.use_rslora": Refuse(f"{NO_LORA}: rsLoRA scaling cannot be requested"),
    "adapter.init": Refuse(f"{NO_LORA}: the adapter initialisation cannot be chosen"),
    "adapter.loraplus_lr_ratio": Refuse(f"{NO_LORA}: LoRA+ learning-rate ratios cannot be set"),
}

# Every documented status (spec FineTuningJob.status enum), plus 'paused' (returned by POST .../pause in the
# spec's example, absent from the enum). tunekit has no paused status: a paused job waits for a person to
# resume it, so it is neither queued nor running; it maps to UNKNOWN (non-terminal) and raw_status says
# 'paused'. Any other value also maps to UNKNOWN (map_status), never a guess.
STATUS_MAP: dict[str, JobStatus] = {
    "validating_files": JobStatus.VALIDATING,
    "queued": JobStatus.QUEUED,
    "running": JobStatus.RUNNING,
    "succeeded": JobStatus.SUCCEEDED,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
    "paused": JobStatus.UNKNOWN,
}

EVENT_LEVELS = {"info": "info", "warn": "warning", "error": "error"}


def base_request(spec: TrainingSpec) -> dict[str, Any]:
    """Required fields before any user-set field applies: the training file and the method type."""
    return {"model": resolve_model(spec.base_model, "openai"), "training_file": TRAINING_FILE,
            "method": {"type": method_type(spec)}}
