"""One retry loop: sync and async calls wait and give up alike; the look-up poll keeps to its window; call_sdk
is the one translate-and-retry distill and eval use."""

from __future__ import annotations

import asyncio

import pytest

from tunekit._exceptions import APIConnectionError, RateLimitError, ServerError
from tunekit._retry import RetryPolicy, poll, retry_call, retry_call_async
from tunekit.backends._managed import call_sdk


def flaky(errors: list[BaseException], calls: list[int]):
    """Raises the given errors in turn, then answers 'ok'."""
    def fn():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"
    return fn


def run_both(errors, policy, monkeypatch):
    """(result or error type, calls, waits) of retry_call and of retry_call_async on the same errors."""
    out = []
    for asynchronous in (False, True):
        waits: list[float] = []
        monkeypatch.setattr("time.sleep", waits.append)

        async def fake_sleep(seconds, waits=waits):
            waits.append(seconds)
        monkeypatch.setattr("asyncio.sleep", fake_sleep)
        calls: list[int] = []
        fn = flaky(errors, calls)
        try:
            if asynchronous:
                async def afn():
                    return fn()
                result = asyncio.run(retry_call_async(afn, policy=policy))
            else:
                result = retry_call(fn, policy=policy)
        except Exception as exc:  # noqa: BLE001 - compared below
            result = type(exc)
        out.append((result, len(calls), waits))
    return out


@pytest.mark.parametrize("errors", [
    [RateLimitError("slow down", provider="p", status_code=429, retry_after=3.0)] * 2,   # waits Retry-After
    [ServerError("boom", provider="p", status_code=503)] * 9,                              # gives up after 4
    [RateLimitError("later", provider="p", status_code=429, retry_after=600.0)],          # above the cap: at once
    [APIConnectionError("dropped", provider="p"), ValueError("a bug, not the network")],  # not retried
])
def test_sync_and_async_calls_retry_alike(errors, monkeypatch):
    policy = RetryPolicy(max_attempts=4, jitter=0.0, max_retry_after=60.0)
    sync, aio = run_both(errors, policy, monkeypatch)
    assert sync == aio
    if errors[0].retry_after == 3.0:
        assert sync == ("ok", 3, [3.0, 3.0])


def test_poll_looks_until_found_or_the_window_closes():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    policy = RetryPolicy(initial=0.5, max_wait=2.0)
    looks: list[float] = []
    assert poll(lambda: looks.append(now[0]), policy=policy, window=5.0, sleep=sleep, monotonic=lambda: now[0]) is None
    assert looks == [0.0, 0.5, 1.5, 3.5, 5.0]  # doubling, capped, never past the window
    looks.clear()

    def shows_up_second():
        looks.append(now[0])
        return "job" if len(looks) == 2 else None

    assert poll(shows_up_second, policy=policy, window=5.0, sleep=sleep, monotonic=lambda: now[0]) == "job"
    assert len(looks) == 2
    looks.clear()
    assert poll(lambda: looks.append(now[0]), policy=policy, window=0.0, sleep=sleep, monotonic=lambda: now[0]) is None
    assert len(looks) == 1  # a window of 0 looks once


class SDKStatusError(Exception):
    """Shaped like the Stainless SDKs' APIStatusError (status_code, body)."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code, self.body = status_code, {"error": {"message": message}}


def test_call_sdk_translates_sdk_errors_and_retries_them(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls: list[int] = []
    fn = flaky([SDKStatusError(503, "overloaded")], calls)
    assert call_sdk(fn, provider="chat", policy=RetryPolicy(max_attempts=2)) == "ok" and len(calls) == 2
    with pytest.raises(RateLimitError, match="chat: slow down") as err:
        call_sdk(flaky([SDKStatusError(429, "slow down")] * 3, []), provider="chat", policy=RetryPolicy(max_attempts=2))
    assert isinstance(err.value.__cause__, SDKStatusError)  # the SDK's error stays in the traceback


def test_call_sdk_raises_an_error_that_is_not_the_sdks_as_it_is():
    bug = KeyError("choices")
    with pytest.raises(KeyError) as err:
        call_sdk(flaky([bug], []), provider="judge")
    assert err.value is bug and err.value.__cause__ is None  # not chained to itself
