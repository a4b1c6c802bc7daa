"""The one retry policy every backend uses (tenacity underneath).

Retries 408/409/429/5xx and connection errors with capped, jittered exponential backoff and honours
``Retry-After`` (``APIError.retry_after``) up to a cap. Non-idempotent calls (creating a paid job) are
never retried blindly: the caller passes ``idempotent=False`` and handles the ambiguous case itself.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from ._exceptions import APIConnectionError, APIError

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 429})


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError):
        return True
    if isinstance(exc, APIError) and exc.status_code is not None:
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial: float = 0.5
    max_wait: float = 8.0
    max_retry_after: float = 60.0
    jitter: float = 0.25

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """``TUNEKIT_MAX_RETRIES`` overrides the attempt count (0 = no retries)."""
        n = os.environ.get("TUNEKIT_MAX_RETRIES")
        return cls(max_attempts=int(n) + 1) if n else cls()

    def wait_seconds(self, attempt: int, exc: BaseException | None) -> float:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and 0 <= retry_after <= self.max_retry_after:
            return float(retry_after)
        base = min(self.max_wait, self.initial * 2 ** max(attempt - 1, 0))
        return base * (1 - self.jitter * random.random())


def retry_call(fn: Callable[[], T], *, policy: RetryPolicy | None = None, idempotent: bool = True,
               on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """Call ``fn`` under the policy. ``idempotent=False`` retries only errors that prove nothing was
    done (429 and 5xx responses are NOT such proof for a create, so only connection refusals
    before sending would be; we conservatively retry nothing)."""
    policy = policy or RetryPolicy.from_env()
    if not idempotent:
        return fn()

    def _wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        seconds = policy.wait_seconds(state.attempt_number, exc)
        if on_retry and exc is not None:
            on_retry(state.attempt_number, exc, seconds)
        return seconds

    retrying = Retrying(
        retry=retry_if_exception(is_retryable),
        stop=stop_after_attempt(max(policy.max_attempts, 1)),
        wait=_wait,
        reraise=True,
    )
    return retrying(fn)


async def retry_call_async(fn, *, policy: RetryPolicy | None = None, idempotent: bool = True):
    """Async twin of :func:`retry_call` (``fn`` returns an awaitable)."""
    import asyncio

    policy = policy or RetryPolicy.from_env()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if not idempotent or not is_retryable(exc) or attempt >= policy.max_attempts:
                raise
            await asyncio.sleep(policy.wait_seconds(attempt, exc))
