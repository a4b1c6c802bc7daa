"""Never two paid jobs: OpenAI and Together against a provider whose job list shows a new job late.

Neither API takes an idempotency key on job create (both SDKs leave ``_idempotency_header`` unset), so the
guarantee rests on the tunekit tag: look for it over a window before any second create, cancel a duplicate
that still shows up, and let reconcile report tagged jobs no store row owns. Fireworks' client-chosen ids
are covered in test_fireworks_lifecycle (a dropped create never makes a second job).
"""

from __future__ import annotations

import pytest

import tunekit
from tests.conftest_openai import NOW
from tests.fake_provider import start_fake
from tunekit._retry import RetryPolicy
from tunekit.job import FineTuneJob
from tunekit.schemas.job import JobStatus
from tunekit.store import Store

MODELS = {"openai": "gpt-4o-mini-2024-07-18", "together": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"}


@pytest.fixture
def fake():
    started = []

    def start(kind: str, **kwargs):
        started.append(start_fake(kind, **kwargs))
        return started[-1]

    yield start
    for f in started:
        f.close()


def backend_for(fake, *, window: float = 30.0):
    from tunekit.backends import get_backend

    options = {"base_url": fake.base_url, "api_key": "sk-test-key-0000",
               "retry_policy": RetryPolicy(initial=0.5, max_wait=8.0, lookup_window=window)}
    if fake.kind == "openai":
        options["clock"] = lambda: NOW
    return fake.attach(get_backend(fake.kind, **options))


def create_kwargs(kind: str, job_id: str) -> dict:
    if kind == "openai":
        return {"model": MODELS[kind], "training_file": "file-train01", "metadata": {"tunekit_job_id": job_id}}
    return {"model": MODELS[kind], "training_file": "file-train01", "suffix": job_id}


@pytest.mark.parametrize("kind", ["openai", "together"])
@pytest.mark.parametrize("lag", [0.05, 6.0])
def test_a_lost_create_reply_never_makes_a_second_job_while_the_list_lags(fake, kind, lag):
    provider = fake(kind, lag=lag, drop_creates=1)
    backend = backend_for(provider)
    record = Store().create_job(kind, {"base_model": MODELS[kind]}, {})
    state = backend.create_once(record, create_kwargs(kind, record.id))
    assert provider.creates == 1  # the first job was found once the list showed it
    assert state.remote_id == provider.jobs[0]["body"]["id"] and not state.events
    assert provider.lists >= 2 and provider.now >= lag  # it kept looking, on the injected clock


@pytest.mark.parametrize("kind", ["openai", "together"])
def test_a_duplicate_listed_after_the_window_is_cancelled_and_recorded(fake, kind):
    # Shown 2.3 s after creation: not within the 2 s window, but by the time of the check after the second
    # create (the retry waits at least 0.375 s first).
    provider = fake(kind, lag=2.3, drop_creates=1)
    backend = backend_for(provider, window=2.0)
    record = Store().create_job(kind, {"base_model": MODELS[kind]}, {})
    state = backend.create_once(record, create_kwargs(kind, record.id))
    first, second = (j["body"]["id"] for j in provider.jobs)
    assert provider.creates == 2 and state.remote_id == first  # the earliest is kept...
    assert provider.cancelled == [second] and provider.live() == [first]  # ...the extra one cancelled at once
    job = FineTuneJob(record).apply(state)
    (event,) = [e for _, e in Store().events(job.id) if e.type == "duplicate"]
    assert second in event.message and event.data == {"duplicate": second, "kept": first}
    assert job.remote_id == first


@pytest.mark.parametrize("kind", ["openai", "together"])
def test_reconcile_reports_tagged_orphans_and_cancels_them_only_when_asked(fake, kind, monkeypatch, capsys):
    from tunekit.cli.main import main

    provider = fake(kind, lag=0.0)
    store = Store()
    owned = store.create_job(kind, {"base_model": MODELS[kind]}, {})
    mine = provider.add_job(owned.id)
    store.update_job(owned.id, remote_id=mine["id"], status=JobStatus.QUEUED)
    duplicate = provider.add_job(owned.id)              # a second job with a row's tag
    stray = provider.add_job("tk-00000000dead")          # a tag no row has (the store was lost)
    provider.add_job(None)                               # not tunekit's: never touched
    provider.add_job("tk-00000000beef", status="cancelled")  # over: reported only
    monkeypatch.setenv(f"{kind.upper()}_API_KEY", "sk-test-key-0000")
    monkeypatch.setenv(f"{kind.upper()}_BASE_URL", provider.base_url)

    assert main(["jobs", "reconcile"]) == 0
    out = capsys.readouterr().out
    assert f"orphan: {kind} {duplicate['id']} (tag {owned.id}" in out and f"duplicate of {mine['id']}" in out
    assert f"orphan: {kind} {stray['id']} (tag tk-00000000dead" in out and "no job with this id" in out
    assert "--cancel-orphans" in out and mine["id"] + " " not in out
    assert provider.cancelled == []  # reporting never cancels

    orphans = tunekit.find_orphans(kind, cancel=True)
    assert sorted(o.remote_id for o in orphans if o.cancelled) == sorted([duplicate["id"], stray["id"]])
    assert sorted(provider.cancelled) == sorted([duplicate["id"], stray["id"]])
    assert any(duplicate["id"] in e.message for _, e in store.events(owned.id) if e.type == "reconcile")
    assert mine["id"] in provider.live()


def test_a_failed_duplicate_check_keeps_the_created_job_and_says_so(fake):
    provider = fake("openai", lag=100.0, drop_creates=1)
    backend = backend_for(provider, window=0.0)
    lists: list = []

    def list_tagged(client, job):
        lists.append(1)
        if len(lists) > 1:  # the check after the second create
            raise tunekit.PermissionDeniedError("openai: list refused", provider="openai", status_code=403)
        return []

    backend._list_tagged = list_tagged
    record = Store().create_job("openai", {"base_model": MODELS["openai"]}, {})
    state = backend.create_once(record, create_kwargs("openai", record.id))
    assert state.remote_id == provider.jobs[1]["body"]["id"]  # the submit does not fail: the job exists
    (event,) = state.events
    assert event.level == "warning" and "tunekit jobs reconcile" in event.message
