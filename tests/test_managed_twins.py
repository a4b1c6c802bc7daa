"""Sync and async lifecycle calls are written once (step functions, one wait loop): here they must agree,
on the cases where the hand-written twins had drifted apart.

The managed backends run against an in-memory SDK client whose every method answers from one script: the
same answer is a value for the sync client and an awaitable for the async one.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import tunekit
from tests.conftest import EXAMPLES
from tests.conftest_openai import NOW, load
from tests.fake_backend import register
from tunekit._exceptions import ServerError
from tunekit._retry import RetryPolicy
from tunekit.store import Store

register()


class Script:
    """Answers by call name (an exception is raised); records every call."""

    def __init__(self, answers: dict, async_: bool):
        self.answers, self.async_, self.calls = answers, async_, []

    def __call__(self, name: str, *args, **kwargs):
        self.calls.append(name)
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        if not self.async_:
            return answer

        async def later():
            return answer
        return later()

    def __getattr__(self, name):  # client.fine_tuning.jobs.retrieve -> script("fine_tuning.jobs.retrieve")
        return _Path(self, name)


class _Path:
    def __init__(self, script, path):
        self.script, self.path = script, path

    def __getattr__(self, name):
        return _Path(self.script, f"{self.path}.{name}")

    def __call__(self, *args, **kwargs):
        return self.script(self.path, *args, **kwargs)


def both(backend_cls, answers: dict, job_record, action: str, **options):
    """(state, calls, log lines) of the sync call and of its async twin, each on a fresh backend."""
    out = []
    for async_ in (False, True):
        backend = backend_cls(api_key="k-test", retry_policy=RetryPolicy(max_attempts=1), **options)
        script = Script(answers, async_)
        backend.make_client = lambda *, async_, script=script: script
        handler = _Lines()
        logging.getLogger("tunekit").addHandler(handler)
        try:
            if async_:
                state = asyncio.run(getattr(backend, "a" + action)(job_record))
            else:
                state = getattr(backend, action)(job_record)
        finally:
            logging.getLogger("tunekit").removeHandler(handler)
        out.append((state, script.calls, handler.lines))
    return out


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _openai_job():
    from openai.types.fine_tuning import FineTuningJob

    return FineTuningJob.model_validate(load("lifecycle")["exchanges"][4]["response"]["json"])  # succeeded


def _record(backend: str, remote_id: str, raw_status: str = "running"):
    store = Store()
    record = store.create_job(backend, {"base_model": "m"}, {})
    return store.update_job(record.id, remote_id=remote_id, raw_status=raw_status)


@pytest.mark.parametrize("checkpoints", ["listed", "failing"])
def test_openai_refresh_and_arefresh_agree_on_checkpoints(checkpoints):
    # Drift: when listing checkpoints failed, refresh logged a line without the job, arefresh one naming it.
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    from tunekit.backends.openai.backend import OpenAIBackend

    page = load("lifecycle")["exchanges"][5]["response"]["json"]
    listed = type("Page", (), {"data": [FineTuningJobCheckpoint.model_validate(c) for c in page["data"]]})()
    answers = {"fine_tuning.jobs.retrieve": _openai_job(),
               "fine_tuning.jobs.checkpoints.list": listed if checkpoints == "listed"
               else ServerError("openai: boom", provider="openai", status_code=500)}
    record = _record("openai", "ftjob-Life0001")
    (sync, sync_calls, sync_log), (aio, aio_calls, aio_log) = both(OpenAIBackend, answers, record, "refresh",
                                                                   clock=lambda: NOW)
    assert sync == aio and sync_calls == aio_calls and sync_log == aio_log
    if checkpoints == "listed":
        assert sync.result.checkpoints and not sync_log
    else:
        assert sync.result.checkpoints == [] and "ftjob-Life0001" in sync_log[0]


def test_together_cancel_and_acancel_agree_on_a_job_already_cancelling():
    from tunekit.backends.together.backend import TogetherBackend

    job = load_together_job()
    answers = {"fine_tuning.retrieve": job, "fine_tuning.cancel": job}
    record = _record("together", job["id"], raw_status="cancel_requested")
    (sync, sync_calls, _), (aio, aio_calls, _) = both(TogetherBackend, answers, record, "cancel")
    assert sync == aio and sync_calls == aio_calls == ["fine_tuning.retrieve"]  # read back, never asked again


def load_together_job():
    import json

    from tests.conftest import ROOT

    rec = json.loads((ROOT / "tests" / "recordings" / "together" / "reconcile.json").read_text())
    listed = next(e["response"]["json"] for e in rec["exchanges"] if "data" in (e["response"].get("json") or {}))
    return listed["data"][0]


def test_wait_and_wait_async_agree_on_a_timeout():
    # Drift: wait_async slept a whole poll interval past the timeout and raised without the hint.
    job = tunekit.finetune(EXAMPLES / "data" / "train.jsonl", base_model="m", backend="fake",
                           backend_options={"script": ["pending"] + ["training"] * 1000})
    errors, took = [], []
    for run in (lambda: job.wait(timeout=0.2, poll_interval=30, progress=False),
                lambda: asyncio.run(job.wait_async(timeout=0.2, poll_interval=30))):
        started = time.monotonic()
        with pytest.raises(tunekit.WaitTimeout) as err:
            run()
        took.append(time.monotonic() - started)
        errors.append((str(err.value), err.value.hint))
    assert errors[0] == errors[1] and "tunekit jobs wait" in errors[0][1]
    assert max(took) < 10  # not the 30 s poll interval: the last sleep ends at the timeout
