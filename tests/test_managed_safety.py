"""Money and secrets on the managed backends: Retry-After honoured, keys checked before a job row, an
unknown-outcome job shown (not crashed on), and one canary per path a credential could leak by."""

from __future__ import annotations

import logging
import traceback
import uuid

import pytest

import tunekit
from tests.conftest import EXAMPLES
from tests.test_managed_create import MODELS, backend_for, create_kwargs, fake  # noqa: F401 (fixture)
from tunekit._exceptions import RateLimitError
from tunekit._retry import RetryPolicy, retry_call
from tunekit.cli.main import main
from tunekit.schemas.job import JobStatus
from tunekit.store import Store

TRAIN = EXAMPLES / "data" / "chat.jsonl"


# -- Retry-After --------------------------------------------------------------------------------------------
def _rate_limited(retry_after: float, calls: list):
    def fn():
        calls.append(1)
        if len(calls) == 1:
            raise RateLimitError("slow down", provider="fake", status_code=429, retry_after=retry_after)
        return "ok"
    return fn


def test_a_retry_after_above_the_cap_fails_at_once_saying_when_to_retry(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    calls: list = []
    with pytest.raises(RateLimitError) as err:
        retry_call(_rate_limited(120.0, calls), policy=RetryPolicy(max_retry_after=60.0))
    assert calls == [1] and slept == []  # never retried sooner than asked
    assert "120 s" in err.value.hint and "60 s" in err.value.hint


def test_a_retry_after_within_the_cap_is_waited_in_full(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    calls: list = []
    policy = RetryPolicy(max_wait=1.0, max_retry_after=60.0)  # longer than any backoff step
    assert retry_call(_rate_limited(30.0, calls), policy=policy) == "ok"
    assert calls == [1, 1] and slept == [30.0]


def test_a_create_refused_with_a_long_retry_after_is_not_retried_early(fake):  # noqa: F811
    provider = fake("openai", lag=0.0)
    backend = backend_for(provider)
    calls: list = []

    def create(client, kwargs):
        calls.append(1)
        raise RateLimitError("slow down", provider="openai", status_code=429, retry_after=600.0)

    backend._create = create
    record = Store().create_job("openai", {"base_model": MODELS["openai"]}, {})
    with pytest.raises(RateLimitError) as err:
        backend.create_once(record, create_kwargs("openai", record.id))
    assert calls == [1] and provider.now == 0.0 and "600 s" in err.value.hint


# -- credentials and unknown jobs --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openai", "together", "fireworks"])
def test_a_missing_key_fails_before_any_job_row(backend):
    with pytest.raises(tunekit.AuthenticationError) as err:
        tunekit.finetune(TRAIN, backend=backend, base_model=MODELS.get(backend, "llama-3.1-8b-instruct"))
    assert err.value.hint and f"{backend.upper()}_API_KEY" in err.value.hint
    assert Store().list_jobs(limit=None) == []


def test_status_of_a_job_whose_submit_outcome_is_unknown(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-0000")
    record = Store().create_job("openai", {"base_model": "gpt-4o-mini"}, {})
    Store().update_job(record.id, status=JobStatus.UNKNOWN,
                       error=f"submit outcome unknown (connection dropped); run `tunekit jobs reconcile {record.id}`")
    assert main(["jobs", "status", record.id]) == 0
    out = capsys.readouterr().out
    assert f"{record.id} [openai] unknown" in out and f"tunekit jobs reconcile {record.id}" in out


def test_wait_on_a_job_whose_submit_outcome_is_unknown_says_to_reconcile(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-0000")
    record = Store().create_job("openai", {"base_model": "gpt-4o-mini"}, {})
    Store().update_job(record.id, status=JobStatus.UNKNOWN, error="submit outcome unknown")
    with pytest.raises(tunekit.JobStateError) as err:  # not a poll loop that can never end
        tunekit.get_job(record.id).wait(timeout=5, poll_interval=0.01, progress=False)
    assert f"tunekit jobs reconcile {record.id}" in err.value.hint


@pytest.mark.parametrize("status", [JobStatus.UNKNOWN, JobStatus.CREATED])
def test_cancel_of_a_job_with_no_remote_id_says_to_reconcile(capsys, monkeypatch, status):
    from tests.test_cli import assert_one_line

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-0000")
    record = Store().create_job("openai", {"base_model": "gpt-4o-mini"}, {})
    Store().update_job(record.id, status=status)
    assert main(["jobs", "cancel", record.id]) == 2  # not the SDK's "Expected a non-empty value" with exit 1
    assert_one_line(capsys.readouterr().err, "no remote job is attached", f"tunekit jobs reconcile {record.id}")
    assert Store().get_job(record.id).status == status


def test_orphans_skip_a_backend_without_credentials(caplog):
    Store().create_job("openai", {"base_model": "gpt-4o-mini"}, {})
    assert tunekit.find_orphans() == []
    assert "orphans not looked for on openai" in caplog.text and "OPENAI_API_KEY" in caplog.text


# -- canaries: one per path ------------------------------------------------------------------------------------
def _canary() -> str:
    return f"sk-canary-{uuid.uuid4().hex}"


def _wandb_canary() -> str:
    return (uuid.uuid4().hex + uuid.uuid4().hex)[:40]  # a W&B key: 40 hex digits, no "sk-" to pattern-match


@pytest.mark.parametrize("kind", ["openai", "together"])
def test_a_key_echoed_by_the_provider_is_masked_in_the_error_and_its_cause(fake, kind, monkeypatch):  # noqa: F811
    wandb = _wandb_canary()
    monkeypatch.setenv("WANDB_API_KEY", wandb)  # the W&B key tunekit passes to the provider
    provider = fake(kind, lag=0.0, echo=f"wandb_api_key {wandb} is not valid")
    backend = backend_for(provider)
    record = Store().create_job(kind, {"base_model": MODELS[kind]}, {})
    with pytest.raises(tunekit.BadRequestError) as err:
        backend.create_once(record, create_kwargs(kind, record.id))
    shown = "".join(traceback.format_exception(err.value))  # the SDK's error is chained: printed too
    assert "is not valid" in shown and wandb not in shown


def test_store_and_events_mask_credentials(monkeypatch, tunekit_home):
    key = _canary()
    monkeypatch.setenv("TOGETHER_API_KEY", key)
    store = Store()
    record = store.create_job("together", {"base_model": "m"}, {})
    store.update_job(record.id, status=JobStatus.FAILED, error=f"together: bad key {key}")
    store.add_event(record.id, tunekit.JobEvent(created_at=0.0, message=f"echo {key}", data={"k": [key]}))
    assert key not in (store.get_job(record.id).error or "")
    assert all(key not in e.model_dump_json() for _, e in store.events(record.id))
    for path in tunekit_home.rglob("*"):  # state.db and its -wal/-shm files
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_the_sdk_debug_log_of_a_create_masks_the_wandb_key(fake, monkeypatch, caplog):  # noqa: F811
    wandb = _wandb_canary()
    monkeypatch.setenv("WANDB_API_KEY", wandb)
    caplog.set_level(logging.DEBUG)
    provider = fake("together", lag=0.0)
    backend = backend_for(provider)
    record = Store().create_job("together", {"base_model": MODELS["together"]}, {})
    kwargs = {**create_kwargs("together", record.id), "wandb_api_key": wandb}
    assert backend.create_once(record, kwargs).remote_id
    assert "Request options" in caplog.text and "***" in caplog.text  # the SDK logged the body...
    assert wandb not in caplog.text  # ...masked


def test_cli_errors_and_debug_tracebacks_mask_an_echoed_key(fake, monkeypatch, capsys):  # noqa: F811
    key = _canary()
    provider = fake("openai", lag=0.0, echo=f"Incorrect API key provided: {key}.")
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("OPENAI_BASE_URL", provider.base_url)
    record = Store().create_job("openai", {"base_model": "gpt-4o-mini"}, {})
    Store().update_job(record.id, remote_id="ftjob-x", status=JobStatus.RUNNING)
    assert main(["jobs", "status", record.id]) == 2
    err = capsys.readouterr().err
    assert "Incorrect API key" in err and key not in err
    monkeypatch.setenv("TUNEKIT_DEBUG", "1")
    with pytest.raises(tunekit.BadRequestError) as raised:
        main(["jobs", "status", record.id])
    shown = "".join(traceback.format_exception(raised.value))
    assert "Traceback" in shown and "Incorrect API key" in shown and key not in shown
