"""The one retry policy every backend uses (tenacity underneath).

Retries 408/409/429/5xx and connection errors with capped, jittered exponential backoff. A
``Retry-After`` (``APIError.retry_after``) is always honoured: never retried sooner; one above
``max_retry_after`` is not waited for, the error says when to retry instead. Non-idempotent calls
(creating a paid job) are never retried blindly: the caller passes ``idempotent=False`` and handles the
ambiguous case itself.
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
    # After an ambiguous create failure: how long to keep looking for the tagged job before creating again
    # (providers list a new job late). 0 = look once.
    lookup_window: float = 30.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """``TUNEKIT_MAX_RETRIES`` overrides the attempt count (0 = no retries);
        ``TUNEKIT_CREATE_LOOKUP_S`` the look-up window after an ambiguous create."""
        fields: dict[str, float] = {}
        if os.environ.get("TUNEKIT_MAX_RETRIES"):
            fields["max_attempts"] = int(os.environ["TUNEKIT_MAX_RETRIES"]) + 1
        if os.environ.get("TUNEKIT_CREATE_LOOKUP_S"):
            fields["lookup_window"] = float(os.environ["TUNEKIT_CREATE_LOOKUP_S"])
        return cls(**fields)  # type: ignore[arg-type]

    def wait_seconds(self, attempt: int, exc: BaseException | None) -> float:
        """Seconds before the next attempt: the server's Retry-After when it sent one, else backoff."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and retry_after >= 0:
            return float(retry_after)
        base = min(self.max_wait, self.initial * 2 ** max(attempt - 1, 0))
        return base * (1 - self.jitter * random.random())

    def gives_up(self, exc: BaseException) -> bool:
        """True when the server asked for a longer wait than the cap: then the error's hint says when to
        retry, and the caller raises it instead of retrying early."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is None or retry_after <= self.max_retry_after:
            return False
        if isinstance(exc, APIError):
            exc.hint = (f"the provider asked to retry after {retry_after:.0f} s, longer than tunekit waits "
                        f"({self.max_retry_after:.0f} s): try again then")
        return True

    def should_retry(self, exc: BaseException) -> bool:
        return is_retryable(exc) and not self.gives_up(exc)


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
        retry=retry_if_exception(policy.should_retry),
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
            if not idempotent or attempt >= policy.max_attempts or not policy.should_retry(exc):
                raise
            await asyncio.sleep(policy.wait_seconds(attempt, exc))
