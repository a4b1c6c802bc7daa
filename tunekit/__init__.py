"""tunekit: one API and CLI for LoRA fine-tuning on managed services and your own GPU.

    import tunekit
    job = tunekit.finetune("train.jsonl", base_model="llama-3.1-8b-instruct", backend="together")
    job.wait(); print(job.result)

Importing tunekit never imports torch, transformers or a provider SDK.
"""

from ._exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BackendNotFoundError,
    BadRequestError,
    ConfigError,
    ConflictError,
    DataValidationError,
    JobNotFoundError,
    JobStateError,
    MissingDependencyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResourceError,
    ServerError,
    StoreError,
    TunekitError,
    UnknownModelError,
    UnsupportedFieldError,
)
from .api import finetune, get_job, list_jobs, load_spec, plan, reconcile, validate
from .job import FineTuneJob, WaitTimeout
from .schemas.job import JobEvent, JobResult, JobStatus, Plan
from .schemas.spec import AdapterConfig, Hyperparameters, TrainingSpec

__version__ = "0.1.0"

__all__ = sorted([
    "APIConnectionError", "APIError", "AdapterConfig", "AuthenticationError", "BackendNotFoundError",
    "BadRequestError", "ConfigError", "ConflictError", "DataValidationError", "FineTuneJob", "Hyperparameters",
    "JobEvent", "JobNotFoundError", "JobResult", "JobStateError", "JobStatus", "MissingDependencyError",
    "NotFoundError", "PermissionDeniedError", "Plan", "RateLimitError", "ResourceError", "ServerError",
    "StoreError", "TrainingSpec", "TunekitError", "UnknownModelError", "UnsupportedFieldError", "WaitTimeout",
    "__version__", "finetune", "get_job", "list_jobs", "load_spec", "plan", "reconcile", "validate",
])
