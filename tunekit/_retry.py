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
from typing import Any, Awaitable, Callable, TypeVar

from tenacity import (AsyncRetrying, RetryCallState, Retrying, retry_if_exception, retry_if_result,
                      stop_after_attempt)

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


def _loop(policy: RetryPolicy, *, retry: Any, stop: Any = None, wait: Any = None,
          on_retry: Callable[[int, BaseException, float], None] | None = None,
          sleep: Callable[[float], Any] | None = None, asynchronous: bool = False, **more: Any) -> Any:
    """The one retry loop: tenacity's ``Retrying`` or ``AsyncRetrying``, built from the same stop, wait and
    retry objects. By default it stops after ``max_attempts`` and waits as the policy says."""

    def policy_wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        seconds = policy.wait_seconds(state.attempt_number, exc)
        if on_retry and exc is not None:
            on_retry(state.attempt_number, exc, seconds)
        return seconds

    options: dict[str, Any] = {"retry": retry, "stop": stop or stop_after_attempt(max(policy.max_attempts, 1)),
                               "wait": wait or policy_wait, "reraise": True, **more}
    if sleep is not None:
        options["sleep"] = sleep
    return (AsyncRetrying if asynchronous else Retrying)(**options)


def retry_call(fn: Callable[[], T], *, policy: RetryPolicy | None = None, idempotent: bool = True,
               on_retry: Callable[[int, BaseException, float], None] | None = None,
               retry_if: Callable[[BaseException], bool] | None = None,
               sleep: Callable[[float], None] | None = None) -> T:
    """Call ``fn`` under the policy. ``idempotent=False`` retries only errors that prove nothing was
    done (429 and 5xx responses are NOT such proof for a create, so only connection refusals
    before sending would be; we conservatively retry nothing). ``retry_if`` replaces the policy's
    choice of errors to retry (the create protocol retries its own set); ``sleep`` the clock's."""
    policy = policy or RetryPolicy.from_env()
    if not idempotent:
        return fn()
    return _loop(policy, retry=retry_if_exception(retry_if or policy.should_retry), on_retry=on_retry,
                 sleep=sleep)(fn)


async def retry_call_async(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy | None = None,
                           idempotent: bool = True) -> T:
    """:func:`retry_call` for a coroutine function: the same loop, sleeping with ``asyncio.sleep``."""
    policy = policy or RetryPolicy.from_env()
    if not idempotent:
        return await fn()
    return await _loop(policy, retry=retry_if_exception(policy.should_retry), asynchronous=True)(fn)


def poll(fn: Callable[[], T | None], *, policy: RetryPolicy, window: float, sleep: Callable[[float], None],
         monotonic: Callable[[], float]) -> T | None:
    """Call ``fn`` until it returns something other than None or ``window`` seconds have passed (one call
    when 0), waiting ``policy.initial`` doubling up to ``policy.max_wait`` between calls, never past the
    window. Errors of ``fn`` are raised at once. The clock is the caller's (a test runs it virtually)."""
    deadline = monotonic() + window

    def closed(state: RetryCallState) -> bool:
        return monotonic() >= deadline

    def backoff(state: RetryCallState) -> float:
        step = min(policy.max_wait, policy.initial * 2 ** (state.attempt_number - 1))
        return max(0.0, min(step, deadline - monotonic()))

    return _loop(policy, retry=retry_if_result(lambda found: found is None), stop=closed, wait=backoff,
                 sleep=sleep, retry_error_callback=lambda state: None)(fn)
