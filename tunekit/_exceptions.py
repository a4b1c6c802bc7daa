"""Every error tunekit raises, in one tree.

    TunekitError
    ├── ConfigError                 a spec, option or argument is wrong (names the field)
    │   ├── UnsupportedFieldError   a set field the chosen backend cannot honour (lists each one)
    │   ├── UnknownModelError       a canonical model name the backend does not offer
    │   └── AdapterNotFoundError    no adapter at that directory, registry id/name or job
    ├── DataValidationError         training data failed validation (carries the ValidationReport)
    ├── BackendNotFoundError        no backend by that name (suggests the closest)
    ├── MissingDependencyError      an optional extra is not installed (gives the pip line)
    ├── JobNotFoundError            no job with that id in the store
    ├── JobStateError               the operation does not fit the job's state (e.g. resume a running job)
    ├── ResourceError               the plan cannot fit the device (memory estimate, suggestions)
    ├── TrainingError               a run went numerically wrong (non-finite loss, gradient or adapter)
    ├── StoreError                  the SQLite store is unusable
    │   └── StaleWriteError         a compare-and-set update lost to another process (read again)
    └── APIError                    a provider call failed (status, provider, request id; never a key)
        ├── BadRequestError         400 / 422
        ├── AuthenticationError     401
        ├── PermissionDeniedError   403
        ├── NotFoundError           404
        ├── ConflictError           409
        ├── RateLimitError          429
        ├── ServerError             5xx
        └── APIConnectionError      no response (connection dropped, timeout)

Every error has ``hint``: the next step a user should take, printed by the CLI.
"""

from __future__ import annotations

import shlex
from typing import Any


class TunekitError(Exception):
    """Base of every tunekit error."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(TunekitError):
    """A spec field, option or argument is invalid. ``field`` names it when known."""

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class UnsupportedFieldError(ConfigError):
    """Fields the user set that the backend cannot honour."""

    def __init__(self, backend: str, dispositions: list[Any]) -> None:
        lines = "; ".join(f"{d.field}: {d.reason}" for d in dispositions)
        super().__init__(
            f"backend {backend!r} cannot honour: {lines}",
            field=dispositions[0].field if dispositions else None,
            hint="remove these fields, or pass on_unsupported='warn' (CLI: --on-unsupported warn) to drop them knowingly",
        )
        self.backend = backend
        self.dispositions = dispositions


class UnknownModelError(ConfigError):
    pass


class AdapterNotFoundError(ConfigError):
    """An adapter reference (directory, registry id/name, job id) names no adapter on this machine."""

    hint = "pass an adapter directory, or an id, name or job id from `tunekit adapters list`"

    def __init__(self, message: str, *, field: str | None = "adapter", hint: str | None = None) -> None:
        super().__init__(message, field=field, hint=hint)


class DataValidationError(TunekitError):
    """The training data is invalid; ``report`` lists every problem with its line."""

    def __init__(self, report: Any, *, command: str | None = None) -> None:
        """``command``: the ``tunekit validate`` line that repeats this check (the run's backend, method and
        max_length); by default the plain one, which applies no backend's rules."""
        first = report.problems[:3]
        shown = "; ".join(f"line {p.line}: {p.message}" if p.line is not None else p.message for p in first)
        more = f" (and {report.problem_count - len(first)} more)" if report.problem_count > len(first) else ""
        super().__init__(
            f"{report.path}: {report.problem_count} problem(s): {shown}{more}",
            hint=f"run `{command or shlex.join(['tunekit', 'validate', str(report.path)])}` to see every problem; "
                 "nothing was uploaded or trained",
        )
        self.report = report


class BackendNotFoundError(TunekitError):
    pass


class MissingDependencyError(TunekitError):
    pass


class JobNotFoundError(TunekitError):
    pass


class JobStateError(TunekitError):
    pass


class ResourceError(TunekitError):
    pass


class TrainingError(TunekitError):
    pass


class StoreError(TunekitError):
    pass


class StaleWriteError(StoreError):
    pass


class APIError(TunekitError):
    """A provider call failed. Messages never contain credentials."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        request_id: str | None = None,
        body: Any = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.provider = provider
        self.status_code = status_code
        self.request_id = request_id
        self.body = body


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    hint = "check the API key (environment variable or api_key=...)"


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class RateLimitError(APIError):
    hint = "wait and retry; tunekit already retried with backoff"


class ServerError(APIError):
    pass


class APIConnectionError(APIError):
    hint = "check the network or the base URL; tunekit already retried"


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
    429: RateLimitError,
}


def api_error_for_status(
    status_code: int | None,
    message: str,
    *,
    provider: str,
    request_id: str | None = None,
    body: Any = None,
    retry_after: float | None = None,
) -> APIError:
    """The one factory that turns an HTTP status into the matching tunekit error."""
    if status_code is None:
        cls: type[APIError] = APIConnectionError
    elif status_code >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status_code, APIError)
    return cls(message, provider=provider, status_code=status_code, request_id=request_id, body=body,
               retry_after=retry_after)
