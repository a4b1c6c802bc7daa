"""The OpenAI backend end to end through the real openai SDK against recorded HTTP (tests/recordings/openai)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("openai")

from tests.conftest_openai import (  # noqa: E402
    CHAT, MODEL, PREFERENCE, RECORDINGS, TRAIN, converted, finetune, make_backend, pin_job_id, sha256,  # noqa: F401
    spec_problems,
)
from tests.replay.fixtures import replay_server  # noqa: E402,F401
from tunekit import _exceptions as errors  # noqa: E402
from tunekit.schemas.job import JobStatus  # noqa: E402
from tunekit.store import default_store  # noqa: E402

JOBS = "/v1/fine_tuning/jobs"


def _lifecycle_checks(srv, job, tmp_path):
    assert job.status is JobStatus.SUCCEEDED and job.raw_status == "succeeded"
    assert job.remote_id == "ftjob-Life0001"
    assert job.result.model == f"ft:{MODEL}:org-tunekit:tunekit:AbC123xy"
    assert job.result.metrics == {"trained_tokens": 5768, "result_files": ["file-results01"]}
    assert [c["step"] for c in job.result.checkpoints] == [10, 20]
    assert job.result.checkpoints[1]["model"].endswith(":ckpt-step-20")
    assert job.result.checkpoints[1]["metrics"]["train_loss"] == 0.41
    # Provider events: each stored once (two polls overlap), oldest first, metrics kept as data.
    provider = [e for _, e in default_store().events(job.id) if e.remote_id]
    assert [e.remote_id for e in provider] == [f"ftevent-{i}" for i in range(1, 7)]
    metrics = [e for e in provider if e.type == "metrics"]
    assert metrics[0].data["train_loss"] == 0.82 and metrics[0].data["total_steps"] == 20
    # What was sent: one create, the exact body, and the converted (chat) rows uploaded.
    srv.assert_done()
    assert srv.count("POST", JOBS) == 1
    (create,) = [r for r in srv.requests if r.method == "POST" and r.path == JOBS]
    assert create.json == {"model": MODEL, "training_file": "file-train01",
                           "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
                           "metadata": {"tunekit_job_id": "tk-openai-life"}}
    upload = srv.requests[0].multipart_field("file")
    assert upload["filename"] == "tunekit-tk-openai-life-train.jsonl"
    assert upload["sha256"] == sha256(converted(TRAIN, tmp_path, "chat"))
    assert srv.requests[0].multipart_field("purpose")["value"] == "fine-tune"
    assert spec_problems(srv) == []


def test_full_lifecycle_sync(replay_server, pin_job_id, tmp_path):
    srv = replay_server(RECORDINGS / "lifecycle.json")
    pin_job_id("tk-openai-life")
    job = finetune(srv, TRAIN, hyperparameters={"epochs": 1})
    assert job.status is JobStatus.VALIDATING and job.remote_id == "ftjob-Life0001"
    job.wait(poll_interval=0.01, progress=False)
    _lifecycle_checks(srv, job, tmp_path)


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
def test_full_lifecycle_async(replay_server, pin_job_id, tmp_path, transport):
    if transport == "aiohttp":
        pytest.importorskip("aiohttp")
    srv = replay_server(RECORDINGS / "lifecycle.json")
    pin_job_id("tk-openai-life")
    job = finetune(srv, TRAIN, hyperparameters={"epochs": 1},
                   backend_options={"http_client": transport if transport == "aiohttp" else None})

    async def run():
        try:
            return await job.wait_async(poll_interval=0.01)
        finally:
            await job.backend.aclient.close()

    asyncio.run(run())
    transport_name = type(job.backend.aclient._client._transport).__name__
    assert ("Aiohttp" in transport_name) == (transport == "aiohttp"), transport_name
    _lifecycle_checks(srv, job, tmp_path)


def test_dpo_create_with_validation(replay_server, pin_job_id, tmp_path):
    srv = replay_server(RECORDINGS / "dpo_create.json")
    pin_job_id("tk-openai-dpo")
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(PREFERENCE.read_text().splitlines(keepends=True)[:12]))
    job = finetune(srv, PREFERENCE, method="dpo", validation_data=valid, suffix="prefs",
                   hyperparameters={"epochs": 2, "batch_size": 4, "seed": 7, "dpo_beta": 0.25},
                   provider_options={"openai": {"learning_rate_multiplier": 0.5}})
    assert job.remote_id == "ftjob-Dpo0001" and job.status is JobStatus.VALIDATING
    srv.assert_done()
    (create,) = [r for r in srv.requests if r.path == JOBS]
    assert create.json == {
        "model": MODEL, "training_file": "file-train01", "validation_file": "file-valid01", "seed": 7,
        "suffix": "prefs", "metadata": {"tunekit_job_id": "tk-openai-dpo"},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "beta": 0.25, "learning_rate_multiplier": 0.5}}}}
    # Preference rows go up unchanged (same bytes), training then validation.
    assert srv.requests[0].multipart_field("file")["sha256"] == sha256(PREFERENCE)
    assert srv.requests[1].multipart_field("file")["sha256"] == sha256(valid)
    assert spec_problems(srv) == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cancel(replay_server, pin_job_id, mode):
    srv = replay_server(RECORDINGS / "cancel.json")
    pin_job_id("tk-openai-cancel")
    job = finetune(srv, CHAT)
    assert job.status is JobStatus.QUEUED
    if mode == "sync":
        job.cancel()
    else:
        async def run():
            try:
                await job.cancel_async()
            finally:
                await job.backend.aclient.close()
        asyncio.run(run())
    assert job.status is JobStatus.CANCELLED
    srv.assert_done()
    # The chat file needed no conversion: its own bytes were uploaded.
    assert srv.requests[0].multipart_field("file")["sha256"] == sha256(CHAT)
    assert spec_problems(srv) == []


def test_failed_job_surfaces_provider_message(replay_server, pin_job_id):
    srv = replay_server(RECORDINGS / "failed.json")
    pin_job_id("tk-openai-failed")
    job = finetune(srv, CHAT)
    job.wait(poll_interval=0.01, progress=False)
    assert job.status is JobStatus.FAILED
    assert "Line 3 is not a dictionary" in job.error
    assert "code invalid_training_file" in job.error and "param training_file" in job.error
    levels = [e.level for _, e in default_store().events(job.id) if e.remote_id]
    assert levels == ["error"]
    srv.assert_done()
    assert spec_problems(srv) == []


def test_400_on_create_is_bad_request_not_retried(replay_server, pin_job_id):
    srv = replay_server(RECORDINGS / "error_400_create.json")
    pin_job_id("tk-openai-e400")
    with pytest.raises(errors.BadRequestError) as info:
        finetune(srv, CHAT)
    assert info.value.status_code == 400 and "not available for fine-tuning" in str(info.value)
    assert srv.count("POST", JOBS) == 1
    record = default_store().get_job("tk-openai-e400")
    assert record.status is JobStatus.FAILED and "not available" in record.error
    srv.assert_done()


def test_401_is_authentication_error_without_the_key(replay_server, pin_job_id):
    srv = replay_server(RECORDINGS / "error_401_upload.json")
    pin_job_id("tk-openai-e401")
    with pytest.raises(errors.AuthenticationError) as info:
        finetune(srv, CHAT, api_key="sk-canary0000000000000000")
    text = f"{info.value} {info.value.hint} {info.value!r}"
    assert "sk-canar" not in text and "Incorrect API key provided" in text
    assert len(srv.requests) == 1  # never retried
    srv.assert_done()


def test_404_is_not_found(replay_server):
    srv = replay_server(RECORDINGS / "error_404_retrieve.json")
    store = default_store()
    record = store.create_job("openai", {"base_model": "gpt-4o-mini"}, {})
    record = store.update_job(record.id, remote_id="ftjob-missing", status=JobStatus.RUNNING)
    with pytest.raises(errors.NotFoundError) as info:
        make_backend(srv).refresh(record)
    assert info.value.status_code == 404 and "ftjob-missing" in str(info.value)
    assert len(srv.requests) == 1
    srv.assert_done()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_429_waits_for_retry_after(replay_server, mode):
    srv = replay_server(RECORDINGS / "rate_limit_429.json")
    store = default_store()
    record = store.update_job(store.create_job("openai", {"base_model": "gpt-4o-mini"}, {}).id,
                              remote_id="ftjob-Retry0001", status=JobStatus.QUEUED)
    backend = make_backend(srv)
    start = time.monotonic()
    if mode == "sync":
        state = backend.refresh(record)
    else:
        async def run():
            try:
                return await backend.arefresh(record)
            finally:
                await backend.aclient.close()
        state = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert state.status is JobStatus.RUNNING
    assert 0.95 <= elapsed < 5, elapsed  # Retry-After: 1 honoured (the policy's own backoff would be ~0.01 s)
    srv.assert_done()
    assert spec_problems(srv) == []


def test_500_then_success_on_create_and_retrieve(replay_server, pin_job_id):
    srv = replay_server(RECORDINGS / "server_error_500.json")
    pin_job_id("tk-openai-retry")
    job = finetune(srv, CHAT)
    assert job.remote_id == "ftjob-Retry0001"
    # create -> 500 (ambiguous) -> looked for the tagged job (none) -> created once more -> listed the tagged
    # jobs again (a late-listed first job would be cancelled as a duplicate; there is none)
    assert [(r.method, r.path) for r in srv.requests[1:]] == [("POST", JOBS), ("GET", JOBS), ("POST", JOBS),
                                                             ("GET", JOBS)]
    assert srv.requests[2].query == srv.requests[4].query == {"metadata[tunekit_job_id]": "tk-openai-retry",
                                                              "limit": "10"}
    assert job.backend.refresh(job.record).status is JobStatus.RUNNING  # 500 then 200
    srv.assert_done()
    assert spec_problems(srv) == []


def test_dropped_create_adopts_the_tagged_job(replay_server, pin_job_id):
    srv = replay_server(RECORDINGS / "dropped_create.json")
    pin_job_id("tk-openai-drop")
    job = finetune(srv, CHAT)
    assert job.remote_id == "ftjob-Drop0001" and job.status is JobStatus.QUEUED
    assert srv.count("POST", JOBS) == 1  # no second paid job
    assert job.backend.refresh(job.record).status is JobStatus.RUNNING
    srv.assert_done()
    assert spec_problems(srv) == []


def test_reconcile_finds_the_tagged_job(replay_server):
    """A crash between the provider's reply and the store write: reconcile() re-attaches by the tag."""
    import tunekit
    from tests.conftest_openai import options

    store = default_store()
    record = store.create_job("openai", {"base_model": "gpt-4o-mini"}, {}, job_id="tk-openai-drop")
    srv = replay_server({"provider": "openai", "exchanges": [
        r for r in __import__("json").loads((RECORDINGS / "dropped_create.json").read_text())["exchanges"]
        if r["request"]["method"] == "GET" and r["request"]["path"] == JOBS]})
    (job,) = tunekit.reconcile(record.id, **options(srv))
    assert job.remote_id == "ftjob-Drop0001" and job.status is JobStatus.QUEUED
    srv.assert_done()


def test_canary_key_never_stored_logged_or_shown(replay_server, pin_job_id, monkeypatch, caplog, tunekit_home,
                                                 tmp_path):
    import logging
    import uuid

    canary = f"sk-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    caplog.set_level(logging.DEBUG)
    srv = replay_server(RECORDINGS / "lifecycle.json")
    pin_job_id("tk-openai-life")
    job = finetune(srv, TRAIN, api_key=None, hyperparameters={"epochs": 1})
    job.wait(poll_interval=0.01, progress=False)
    assert job.status is JobStatus.SUCCEEDED
    assert canary not in repr(job.backend) and canary not in repr(vars(job.backend))
    events = " ".join(e.model_dump_json() for _, e in default_store().events(job.id))
    assert canary not in events and canary not in caplog.text
    for path in tunekit_home.rglob("*"):  # state.db and its -wal/-shm files
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
