"""tunekit: one API and CLI for LoRA fine-tuning on managed services and your own GPU.

    import tunekit
    job = tunekit.finetune("train.jsonl", base_model="llama-3.1-8b-instruct", backend="together")
    job.wait(); print(job.result)

Names are imported on first use (PEP 562), so ``import tunekit`` and the CLI start fast and never
import torch, transformers or a provider SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **{name: "tunekit._exceptions" for name in (
        "APIConnectionError", "APIError", "AdapterNotFoundError", "AuthenticationError", "BackendNotFoundError",
        "BadRequestError", "ConfigError", "ConflictError", "DataValidationError", "JobNotFoundError", "JobStateError",
        "MissingDependencyError", "NotFoundError", "PermissionDeniedError", "RateLimitError", "ResourceError",
        "ServerError", "StoreError", "TrainingError", "TunekitError", "UnknownModelError", "UnsupportedFieldError")},
    **{name: "tunekit.api" for name in ("estimate_cost", "find_orphans", "finetune", "finetune_from", "get_job",
                                         "import_openai", "list_jobs", "load_spec", "plan", "reconcile", "validate")},
    "distill": "tunekit.data.distill",
    "evaluate": "tunekit.eval.run",
    "EvalResult": "tunekit.eval.run",
    "FineTuneJob": "tunekit.job",
    "WaitTimeout": "tunekit.job",
    **{name: "tunekit.schemas.job" for name in ("JobEvent", "JobResult", "JobStatus", "Plan")},
    **{name: "tunekit.schemas.spec" for name in ("AdapterConfig", "Hyperparameters", "TrainingSpec")},
    "ValidationReport": "tunekit.schemas.report",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a submodule, e.g. tunekit.api, as after an eager import
            return importlib.import_module(f"tunekit.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tunekit.{name}":
                raise
            raise AttributeError(f"module 'tunekit' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs
    from ._exceptions import *  # noqa: F401,F403
    from .api import (estimate_cost, find_orphans, finetune, finetune_from, get_job, import_openai,  # noqa: F401
                      list_jobs, load_spec, plan, reconcile, validate)
    from .data.distill import distill  # noqa: F401
    from .eval.run import EvalResult, evaluate  # noqa: F401
    from .job import FineTuneJob, WaitTimeout  # noqa: F401
    from .schemas.job import JobEvent, JobResult, JobStatus, Plan  # noqa: F401
    from .schemas.report import ValidationReport  # noqa: F401
    from .schemas.spec import AdapterConfig, Hyperparameters, TrainingSpec  # noqa: F401
