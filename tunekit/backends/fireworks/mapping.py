"""Fireworks: every TrainingSpec field mapped, transformed or refused; every job state mapped.

Pure data and small functions (no SDK import), so ``tunekit plan --backend fireworks`` stays cheap.
The request is written in Fireworks' wire form (camelCase, as the plan shows it); ``backend.py`` turns
it into the SDK's keyword arguments. SFT jobs take a flat body (``POST .../supervisedFineTuningJobs``);
DPO jobs (``POST .../dpoJobs``) nest the hyperparameters in ``trainingConfig`` and the loss in
``lossConfig``. Sources: fireworks-ai 1.2.30 (``types/*_create_params.py``) and
docs/backends/fireworks.md.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Optional

from pydantic import ConfigDict, Field, create_model

from ..._exceptions import ConfigError
from ...catalog import canonical_name, resolve_model
from ...schemas.job import JobStatus
from ...schemas.spec import TrainingSpec
from ..base import PlanContext, Refuse, Rule, Send

# Filled in at submit (create_kwargs), once the tunekit job id and the account are known.
ACCOUNT, JOB = "{account}", "{job}"
TRAIN_DATASET = f"accounts/{ACCOUNT}/datasets/{JOB}-train"
EVAL_DATASET = f"accounts/{ACCOUNT}/datasets/{JOB}-eval"
ENDPOINTS = {"sft": "POST /v1/accounts/{account}/supervisedFineTuningJobs",
             "dpo": "POST /v1/accounts/{account}/dpoJobs"}
TEMPLATED = ("dataset", "evaluationDataset", "outputModel", "trainingConfig.outputModel")

MAX_EXAMPLES = 3_000_000          # per dataset, and epochs x examples (Fireworks docs)
LORA_RANKS = (1, 2, 4, 8, 16, 32, 64)  # "a power of 2 up to 64" (docs); default 8
DPO_BETA_MAX = 0.5                # DpoConfig.beta: "Must be > 0 and < 0.5"

DEPLOY_NOTE = ("Fireworks models must be deployed before inference: create an on-demand deployment of the "
               "output model (firectl create deployment <model>), or load it onto a multi-LoRA deployment")


def is_dpo(spec: TrainingSpec) -> bool:
    return spec.method == "dpo"


def hp(name: str):
    """Target of a hyperparameter: top level for SFT, inside ``trainingConfig`` for DPO."""
    return lambda spec: f"trainingConfig.{name}" if is_dpo(spec) else name


# -- conversions ------------------------------------------------------------------------------------------

def to_base_model(value: str, ctx: PlanContext) -> str:
    """Canonical name or Fireworks id -> ``accounts/<owner>/models/<id>``."""
    resolved = resolve_model(value, "fireworks")
    if resolved.startswith("accounts/"):
        return resolved
    if "/" not in resolved:
        return f"accounts/fireworks/models/{resolved}"
    canonical = canonical_name(resolved)  # e.g. the Hugging Face id of a catalogued model
    if canonical is not None:
        return resolve_model(canonical, "fireworks")
    raise ConfigError(
        f"base_model {value!r} is not a Fireworks model name", field="base_model",
        hint="use a Fireworks id such as accounts/fireworks/models/qwen3-8b (or just qwen3-8b), "
             "or a catalogued name such as llama-3.1-8b-instruct",
    )


def warmup_steps(ratio: float, ctx: PlanContext) -> int:
    """Warmup ratio -> steps: ceil(ratio x epochs x ceil(rows / batch_size)), as transformers counts it."""
    if ctx.rows is None:
        raise ConfigError(
            "hyperparameters.warmup_ratio: Fireworks counts warmup in steps; converting the ratio needs the "
            "number of training rows", field="hyperparameters.warmup_ratio",
            hint="give the row count: tunekit.plan(..., rows=N) or `tunekit plan SPEC --backend fireworks --rows N`")
    h = ctx.spec.hyperparameters
    total = h.epochs * math.ceil(ctx.rows / h.batch_size)
    return math.ceil(round(ratio * total, 9))  # round first: 0.1 * 30 is 3.0000000000000004


def slug(text: str) -> str:
    """A Fireworks resource id piece: lowercase a-z, 0-9 and '-', starting with a letter."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    s = re.sub(r"-{2,}", "-", s)
    if not s or not s[0].isalpha():
        s = "m-" + s
    return s[:40].rstrip("-")


def output_model(suffix: str, ctx: PlanContext) -> str:
    # The job id keeps the model id unique per account (as OpenAI's ft:...:suffix:id does).
    return f"accounts/{ACCOUNT}/models/{slug(suffix)}-{JOB}"


def job_id_for(tunekit_id: str) -> str:
    """The client-chosen Fireworks job id for a tunekit job (natural idempotency: a repeat is a 409)."""
    s = re.sub(r"[^a-z0-9-]+", "-", tunekit_id.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "tk-" + s
    return s[:63].rstrip("-")


# -- field rules ------------------------------------------------------------------------------------------

def _lora_rank(spec: TrainingSpec) -> Rule:
    r = spec.adapter.r
    if r in LORA_RANKS:
        return Send(hp("loraRank"))
    nearest = min(LORA_RANKS, key=lambda x: (abs(x - r), -x))  # ties go up
    return Refuse(f"Fireworks takes a LoRA rank that is a power of 2 up to 64 (got {r}); use e.g. {nearest}")


def _dpo_beta(spec: TrainingSpec) -> Rule:
    if not is_dpo(spec):
        return Refuse("applies to method='dpo' only")
    if spec.hyperparameters.dpo_beta >= DPO_BETA_MAX:
        return Refuse(f"Fireworks requires 0 < beta < {DPO_BETA_MAX} (lossConfig.dpo.beta)")
    return Send("lossConfig.dpo.beta")


def _warmup(spec: TrainingSpec) -> Rule:
    if "batch_size" not in spec.hyperparameters.model_fields_set:
        return Refuse("Fireworks counts warmup in steps and picks its own batch size; also set "
                      "hyperparameters.batch_size so the ratio converts to exact steps")
    return Send(hp("learningRateWarmupSteps"), convert=warmup_steps,
                note="steps = ceil(ratio x epochs x ceil(rows / batch_size))")


def _validation(spec: TrainingSpec) -> Rule:
    if is_dpo(spec):
        return Refuse("Fireworks DPO jobs take no evaluation dataset")
    return Send("evaluationDataset", convert=lambda v, ctx: EVAL_DATASET,
                note="uploaded as a Fireworks dataset at submit")


FIELD_MAP: dict[str, Any] = {
    "base_model": Send(hp("baseModel"), convert=to_base_model),
    # Not a body field: it picks the endpoint.
    "method": Send(None, note="sft -> POST .../supervisedFineTuningJobs; dpo -> POST .../dpoJobs "
                              "with lossConfig.method DPO"),
    "validation_data": _validation,
    "suffix": Send(hp("outputModel"), convert=output_model,
                   note="{account} and {job} (the Fireworks job id) are filled in at submit"),
    "quantization": Refuse("Fireworks picks the training precision itself; there is no QLoRA switch"),
    # hyperparameters
    "hyperparameters.epochs": Send(hp("epochs")),
    "hyperparameters.batch_size": Send(hp("batchSizeSamples"),
                                       note="samples per gradient batch (Fireworks' batchSize counts tokens)"),
    "hyperparameters.learning_rate": Send(hp("learningRate")),
    "hyperparameters.warmup_ratio": _warmup,
    "hyperparameters.lr_scheduler": Refuse(
        "not in the fireworks-ai SDK; Fireworks keeps the rate constant after warmup (docs v5.10 add "
        "lrScheduler for Training V2 models only)"),
    "hyperparameters.weight_decay": Send(hp("optimizerWeightDecay")),
    "hyperparameters.max_grad_norm": Refuse("Fireworks does not expose gradient clipping"),
    "hyperparameters.gradient_accumulation_steps": Refuse(
        "deprecated by Fireworks and rejected by Training V2; batch_size already sets the global batch"),
    "hyperparameters.max_length": Send(hp("maxContextLength"), note="longer examples are truncated"),
    "hyperparameters.seed": Refuse("Fireworks has no seed parameter (none in the SDK's create params)"),
    "hyperparameters.dpo_beta": _dpo_beta,
    # adapter: Fireworks exposes only the rank
    "adapter.r": _lora_rank,
    "adapter.alpha": Refuse("Fireworks sets LoRA alpha itself; only the rank (loraRank) is exposed"),
    "adapter.dropout": Refuse("Fireworks does not expose LoRA dropout"),
    "adapter.target_modules": Refuse("Fireworks chooses the LoRA target modules itself"),
    "adapter.use_dora": lambda spec: (Refuse("Fireworks trains plain LoRA adapters (no DoRA)") if spec.adapter.use_dora
                                      else Send(None, note="plain LoRA is what Fireworks trains")),
    "adapter.use_rslora": Refuse("Fireworks does not expose rsLoRA scaling"),
    "adapter.init": Refuse("Fireworks does not expose the adapter initialisation"),
    "adapter.loraplus_lr_ratio": lambda spec: (Refuse("Fireworks does not expose LoRA+")
                                               if spec.adapter.loraplus_lr_ratio is not None
                                               else Send(None, note="no LoRA+: one learning rate")),
}

# provider_options.fireworks.<key>: wire keys of the create params that tunekit does not map itself, with
# their SDK types (checked against the SDK's TypedDicts by tests/test_fireworks_mapping.py). Dotted keys nest.
SFT, DPO, BOTH = ("sft",), ("dpo",), ("sft", "dpo")
Config = dict[str, Any]   # an object Fireworks checks itself
Positive = Annotated[int, Field(ge=1)]
_OPTIONS: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "displayName": (str, BOTH, "the job's name in the Fireworks console"),
    "wandbConfig": (Config, BOTH, "Weights & Biases settings, e.g. {'enabled': true, 'project': 'p'}"),
    "awsS3Config": (Config, BOTH, "credentials for data in S3"),
    "azureBlobStorageConfig": (Config, BOTH, "credentials for data in Azure Blob Storage"),
    "rendererHuggingFaceRepoId": (str, BOTH, "Hugging Face repo whose chat template renders the rows"),
    "reservationTarget": (str, BOTH, "the reservation to train on"),
    "useReservation": (bool, BOTH, "train on reserved capacity"),
    "evalAutoCarveout": (bool, SFT, "carve an evaluation split out of the training data"),
    "earlyStop": (bool, SFT, "stop when the evaluation loss stops improving"),
    "isTurbo": (bool, SFT, "turbo (faster, dearer) training"),
    "jinjaTemplate": (str, SFT, "a Jinja chat template"),
    "nodes": (Positive, SFT, "training nodes, >= 1"),
    "region": (str, SFT, "region, e.g. US_IOWA_1"),
    "warmStartFrom": (str, SFT, "an adapter model to continue training"),
    "mtpEnabled": (bool, SFT, "train multi-token-prediction heads"),
    "mtpFreezeBaseModel": (bool, SFT, "train only the MTP heads"),
    "mtpNumDraftTokens": (Positive, SFT, "MTP draft tokens, >= 1"),
    "usePurpose": (str, SFT, "capacity purpose"),
    "samplerCheckpointSaveIntervalSteps": (Positive, SFT, "steps between sampler checkpoints, >= 1"),
    "batchSize": (Positive, SFT, "tokens per batch, >= 1"),
    "metricsFileSignedUrl": (str, SFT, "a signed URL Fireworks writes metrics to"),
    "trainingConfig.region": (str, DPO, "region, e.g. US_IOWA_1"),
    "trainingConfig.warmStartFrom": (str, DPO, "an adapter model to continue training"),
    "trainingConfig.jinjaTemplate": (str, DPO, "a Jinja chat template"),
    "trainingConfig.batchSize": (Positive, DPO, "tokens per batch, >= 1"),
    "trainingConfig.samplerCheckpointSaveIntervalSteps": (Positive, DPO, "steps between sampler checkpoints, >= 1"),
    "lossConfig.dpo.refCacheConcurrency": (Positive, DPO, "reference-model cache concurrency, >= 1"),
    "lossConfig.dpo.refCacheBatchSize": (Positive, DPO, "reference-model cache batch size, >= 1"),
}
FireworksOptions = create_model(  # a model built from the table: dotted wire keys are not Python names
    "FireworksOptions", __config__=ConfigDict(extra="forbid", strict=True, frozen=True),
    __doc__="``provider_options={'fireworks': {...}}``: create-body keys, sent as is (docs/backends/fireworks.md).",
    **{key: (Optional[kind], Field(None, description=f"{what} ({', '.join(jobs).upper()} jobs)"))
       for key, (kind, jobs, what) in _OPTIONS.items()})
SFT_OPTION_KEYS = frozenset(key for key, (_, jobs, _) in _OPTIONS.items() if "sft" in jobs)
DPO_OPTION_KEYS = frozenset(key for key, (_, jobs, _) in _OPTIONS.items() if "dpo" in jobs)
# Keys a spec field owns: setting them as options would bypass the field's checks.
OWNED_KEYS = {
    "dataset": "data", "baseModel": "base_model", "outputModel": "suffix", "epochs": "hyperparameters.epochs",
    "learningRate": "hyperparameters.learning_rate", "learningRateWarmupSteps": "hyperparameters.warmup_ratio",
    "loraRank": "adapter.r", "maxContextLength": "hyperparameters.max_length",
    "batchSizeSamples": "hyperparameters.batch_size", "optimizerWeightDecay": "hyperparameters.weight_decay",
    "evaluationDataset": "validation_data", "gradientAccumulationSteps": "(refused: see the plan)",
    "lossConfig.method": "method", "lossConfig.dpo.beta": "hyperparameters.dpo_beta",
}


def option_refusal(key: str, spec: TrainingSpec) -> Refuse | None:
    """Why ``provider_options.fireworks.<key>`` cannot be sent on this job (None: it can; its value is then
    checked by FireworksOptions)."""
    bare = key.removeprefix("trainingConfig.")
    if key in OWNED_KEYS or bare in OWNED_KEYS:
        return Refuse(f"set through the spec field {OWNED_KEYS.get(key) or OWNED_KEYS[bare]} instead")
    keys = DPO_OPTION_KEYS if is_dpo(spec) else SFT_OPTION_KEYS
    if key not in keys:
        return Refuse(f"not a Fireworks {'DPO' if is_dpo(spec) else 'SFT'} job option; valid: {', '.join(sorted(keys))}")
    return None


# -- job states -------------------------------------------------------------------------------------------
# Every JOB_STATE_* of the SDK's literal (1.2.30) plus DELETED/ARCHIVED from docs v5.10.
STATUS_MAP: dict[str, JobStatus] = {
    "JOB_STATE_UNSPECIFIED": JobStatus.UNKNOWN,
    "JOB_STATE_CREATING": JobStatus.QUEUED,
    "JOB_STATE_PENDING": JobStatus.QUEUED,
    "JOB_STATE_RE_QUEUEING": JobStatus.QUEUED,
    "JOB_STATE_IDLE": JobStatus.QUEUED,
    # Paused by Fireworks (account suspension or manual); resumable with :resume. Not progressing, not over.
    "JOB_STATE_PAUSED": JobStatus.QUEUED,
    "JOB_STATE_VALIDATING": JobStatus.VALIDATING,
    "JOB_STATE_CREATING_INPUT_DATASET": JobStatus.VALIDATING,
    "JOB_STATE_RUNNING": JobStatus.RUNNING,
    "JOB_STATE_WRITING_RESULTS": JobStatus.RUNNING,
    "JOB_STATE_CANCELLING": JobStatus.CANCELLING,
    "JOB_STATE_COMPLETED": JobStatus.SUCCEEDED,
    # Stopped by early stopping (earlyStop, only if the user asked via provider options): the output
    # model holds the weights at the stop, so it is a success; an event says it stopped early.
    "JOB_STATE_EARLY_STOPPED": JobStatus.SUCCEEDED,
    "JOB_STATE_FAILED": JobStatus.FAILED,
    "JOB_STATE_EXPIRED": JobStatus.FAILED,
    "JOB_STATE_CANCELLED": JobStatus.CANCELLED,
    # Deleted on Fireworks before tunekit saw an end: over, and nothing to collect.
    "JOB_STATE_DELETING": JobStatus.CANCELLED,
    "JOB_STATE_DELETING_CLEANING_UP": JobStatus.CANCELLED,
    "JOB_STATE_DELETED": JobStatus.CANCELLED,
    "JOB_STATE_ARCHIVED": JobStatus.CANCELLED,
}
DELETED_STATES = frozenset({"JOB_STATE_DELETING", "JOB_STATE_DELETING_CLEANING_UP", "JOB_STATE_DELETED",
                            "JOB_STATE_ARCHIVED"})
