"""The Together backend against recorded exchanges replayed to the real `together` SDK (sync and async)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time

import pytest

import tunekit
from tunekit.job import FineTuneJob
from tunekit.schemas.job import JobStatus
from tunekit.store import Store
from tests.conftest_together import (  # noqa: F401  (fixtures)
    EXAMPLE_DATA, FT, JOB_ID, MODEL, TRAIN_FILE, VALID_FILE, pinned_job_id, recording, replay_server, rows_of,
    sent, together_env, unexplained,
)
from tests.replay.spec_check import check_server, load_provider_spec

pytest.importorskip("together")
TRAIN = EXAMPLE_DATA / "train.jsonl"


def _spec_clean(server) -> None:
    """Every request the SDK sent and every response served: valid per the spec, or a known divergence."""
    spec = load_provider_spec("together")
    left, _ = unexplained(check_server(spec, server, error_schema="ErrorData"))
    assert left == []


def _remote_job(status=JobStatus.RUNNING, raw="running", remote_id=FT) -> FineTuneJob:
    store = Store()
    record = store.create_job("together", {"base_model": MODEL}, {"train": {"path": str(TRAIN), "kind": "prompt_response"}})
    store.update_job(record.id, remote_id=remote_id, status=status, raw_status=raw)
    return FineTuneJob(store.get_job(record.id), store=store)


def test_full_lifecycle_sft(together_env, pinned_job_id):
    srv = together_env("lifecycle")
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together",
                           hyperparameters={"epochs": 1})
    assert (job.remote_id, job.status, job.raw_status) == (FT, JobStatus.QUEUED, "pending")
    job.wait(poll_interval=0.01, progress=False)
    srv.assert_done()

    assert job.status is JobStatus.SUCCEEDED and job.raw_status == "completed"
    assert job.result.model == f"acme/Meta-Llama-3.1-8B-Instruct-Reference-{JOB_ID}-1c2d3e4f"
    assert [c["step"] for c in job.result.checkpoints] == [12, 6]
    assert job.result.metrics["token_count"] == 36000 and job.result.registry_id
    assert job.progress["step"] == 12 and job.progress["total_steps"] == 12
    events = [e for _, e in job.events() if e.remote_id]
    assert [e.type for e in events] == ["job_pending", "job_start", "training_start", "checkpoint_save",
                                        "training_complete", "job_complete"]  # each stored once, in order
    assert events[3].data["checkpoint_path"].endswith("checkpoint-12")

    # the upload: prompt/response rows went up as Together's prompt/completion rows, all of them
    (put,) = sent(srv, "PUT", f"/presigned/{TRAIN_FILE}")
    uploaded = rows_of(put.raw)
    source = [json.loads(line) for line in TRAIN.read_text().splitlines() if line.strip()]
    assert uploaded == [{"prompt": r["prompt"], "completion": r["response"]} for r in source]
    (form,) = sent(srv, "POST", "/v1/files")
    fields = {p["name"]: p.get("value") for p in form.multipart}
    assert fields["purpose"] == "fine-tune" and fields["file_type"] == "jsonl"
    assert fields["checksum"] == hashlib.sha256(put.raw).hexdigest()
    # one paid create, tagged with the tunekit id; LoRA; outputs-only SFT
    (create,) = sent(srv, "POST", "/v1/fine-tunes")
    assert create.json["suffix"] == JOB_ID and create.json["model"] == MODEL
    assert create.json["training_type"]["type"] == "Lora"
    assert create.json["training_method"] == {"method": "sft", "train_on_inputs": False}
    assert len(sent(srv, "GET", "/v1/fine-tunes/models/limits")) == 1  # fetched once, handed to the SDK
    _spec_clean(srv)


def test_full_lifecycle_async_client(together_env, pinned_job_id):
    srv = together_env("lifecycle")
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together",
                           hyperparameters={"epochs": 1})
    asyncio.run(job.wait_async(poll_interval=0.01))  # retrieve/events/checkpoints on AsyncTogether
    srv.assert_done()
    assert job.status is JobStatus.SUCCEEDED and len(job.result.checkpoints) == 2
    assert len([e for _, e in job.events() if e.remote_id]) == 6


def test_dpo_create_with_validation_and_dedupe(together_env, pinned_job_id, tmp_path):
    srv = together_env("dpo_create")
    valid = tmp_path / "preference_valid.jsonl"
    valid.write_text("".join(EXAMPLE_DATA.joinpath("preference.jsonl").read_text().splitlines(True)[:4]))
    job = tunekit.finetune(EXAMPLE_DATA / "preference.jsonl", base_model="llama-3.1-8b-instruct",
                           backend="together", method="dpo", hyperparameters={"dpo_beta": 0.2},
                           adapter={"r": 16, "alpha": 32}, suffix="pref", validation_data=valid)
    srv.assert_done()
    assert job.status is JobStatus.QUEUED and job.remote_id == FT
    (create,) = sent(srv, "POST", "/v1/fine-tunes")
    body = create.json
    assert body["training_method"]["method"] == "dpo" and body["training_method"]["dpo_beta"] == 0.2
    assert body["training_type"] == {"type": "Lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                     "lora_trainable_modules": "all-linear"}
    assert (body["validation_file"], body["n_evals"], body["suffix"]) == (VALID_FILE, 10, f"pref-{JOB_ID}")
    # preference rows are Together's own format: uploaded byte for byte
    (put,) = sent(srv, "PUT", f"/presigned/{TRAIN_FILE}")
    assert put.raw == EXAMPLE_DATA.joinpath("preference.jsonl").read_bytes()
    # the validation file was already there (409): no second PUT, the existing id is used
    assert len(sent(srv, "PUT", f"/presigned/{VALID_FILE}")) == 0
    assert len(sent(srv, "GET", f"/v1/files/{VALID_FILE}")) == 1
    _spec_clean(srv)


def test_cancel_then_cancelled(together_env):
    srv = together_env("cancel")
    job = _remote_job()
    job.cancel()
    assert (job.status, job.raw_status) == (JobStatus.CANCELLING, "cancel_requested")
    job.refresh()
    srv.assert_done()
    assert job.status is JobStatus.CANCELLED
    assert any(e.type == "cancel_requested" for _, e in job.events())
    with pytest.raises(tunekit.JobStateError):
        job.cancel()


def test_cancel_async(together_env):
    srv = together_env("cancel")
    job = _remote_job()
    asyncio.run(job.cancel_async())
    assert job.status is JobStatus.CANCELLING
    asyncio.run(job.refresh_async())
    srv.assert_done()
    assert job.status is JobStatus.CANCELLED


def test_cancel_while_cancel_requested_does_not_post_again(together_env):
    cancelled = recording("cancel")["exchanges"][1]
    srv = together_env({"exchanges": [cancelled]})
    job = _remote_job(JobStatus.CANCELLING, "cancel_requested")
    job.backend.cancel(job.record)
    srv.assert_done()
    assert sent(srv, "POST", f"/v1/fine-tunes/{FT}/cancel") == []


def test_failed_job_surfaces_provider_message(together_env):
    srv = together_env("failed")
    job = _remote_job()
    job.refresh()
    srv.assert_done()
    assert job.status is JobStatus.FAILED and job.raw_status == "error"
    assert "3 examples longer than max_seq_length" in job.error
    assert [e.level for _, e in job.events() if e.type == "job_error"] == ["error"]


def test_400_on_create_is_bad_request_and_fails_the_job(together_env, pinned_job_id):
    srv = together_env("error_400_create")
    with pytest.raises(tunekit.BadRequestError) as exc:
        tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together")
    srv.assert_done()
    assert exc.value.status_code == 400 and "n_epochs must be at most 20" in str(exc.value)
    assert len(sent(srv, "POST", "/v1/fine-tunes")) == 1  # a 400 is not retried
    record = Store().get_job(JOB_ID)
    assert record.status is JobStatus.FAILED and "n_epochs must be at most 20" in record.error


def test_401_is_authentication_error_with_the_servers_message(together_env):
    srv = together_env("error_401_upload")
    with pytest.raises(tunekit.AuthenticationError) as exc:
        tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together")
    srv.assert_done()
    assert "Invalid API key provided" in str(exc.value) and "free trial" not in str(exc.value)
    assert srv.api_key not in str(exc.value) and srv.api_key not in repr(exc.value)


def test_404_on_retrieve_is_not_found(together_env):
    srv = together_env("error_404_retrieve")
    job = _remote_job(remote_id="ft-00000000-0000-0000-0000-000000000000")
    with pytest.raises(tunekit.NotFoundError):
        job.refresh()
    srv.assert_done()


def test_429_honours_retry_after_and_creates_once(together_env, pinned_job_id, monkeypatch):
    srv = together_env("retry_429_create")
    from tunekit.backends import _managed

    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(_managed.time, "sleep", lambda s: (waits.append(s), real_sleep(s))[1])
    started = time.monotonic()
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together")
    elapsed = time.monotonic() - started
    srv.assert_done()
    assert waits == [1.0] and elapsed >= 1.0
    assert job.remote_id == FT and len(sent(srv, "POST", "/v1/fine-tunes")) == 2
    assert sent(srv, "GET", "/v1/fine-tunes") == []  # a 429 proves nothing was created: no lookup needed


def test_500_on_create_looks_before_creating_again(together_env, pinned_job_id):
    srv = together_env("retry_500_create")
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together")
    srv.assert_done()
    order = [(r.method, r.path) for r in srv.requests if r.path in ("/v1/fine-tunes",)]
    # the last GET: after a second create, any other tagged job would be cancelled as a duplicate
    assert order == [("POST", "/v1/fine-tunes"), ("GET", "/v1/fine-tunes"), ("POST", "/v1/fine-tunes"),
                     ("GET", "/v1/fine-tunes")]
    assert job.remote_id == FT and job.status is JobStatus.QUEUED


def test_dropped_connection_on_create_finds_the_tagged_job(together_env, pinned_job_id):
    srv = together_env("drop_create")
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together")
    srv.assert_done()
    assert len(sent(srv, "POST", "/v1/fine-tunes")) == 1  # never a second paid job
    assert job.remote_id == FT and job.status is JobStatus.QUEUED  # not ft-older, which has another tag


def test_reconcile_reattaches_by_tag(together_env):
    srv = together_env("reconcile")
    Store().create_job("together", {"base_model": MODEL}, {}, job_id=JOB_ID)
    (job,) = tunekit.reconcile()
    srv.assert_done()
    assert job.remote_id == FT and job.status is JobStatus.RUNNING
    assert any("re-attached" in e.message for _, e in Store().events(JOB_ID) if e.type == "reconcile")


def test_canary_key_never_stored_or_logged(together_env, pinned_job_id, caplog):
    caplog.set_level(logging.DEBUG)
    srv = together_env("lifecycle")
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together",
                           hyperparameters={"epochs": 1})
    job.wait(poll_interval=0.01, progress=False)
    srv.assert_done()
    key = srv.api_key
    home = Store().path.parent
    stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert stored and key.encode() not in stored
    assert all(key not in e.model_dump_json() for _, e in job.events())
    assert key not in caplog.text and caplog.records  # something was logged, and not the key
    assert key not in repr(job.backend) and key not in repr(job) and key not in json.dumps(job.record.request)
    assert all(key not in json.dumps(r.headers) for r in srv.requests)


def test_file_not_named_jsonl_is_uploaded_as_a_jsonl_copy(together_env, pinned_job_id, tmp_path):
    """The SDK takes the file type from the extension: a .txt file goes up as a .jsonl copy."""
    srv = together_env("lifecycle")
    chat = tmp_path / "chat.txt"
    shutil.copy(EXAMPLE_DATA / "chat.jsonl", chat)
    job = tunekit.finetune(chat, base_model="llama-3.1-8b-instruct", backend="together", hyperparameters={"epochs": 1})
    assert job.remote_id == FT
    (form,) = sent(srv, "POST", "/v1/files")
    assert {p["name"]: p.get("value") for p in form.multipart}["file_name"] == "chat.jsonl"
    (put,) = sent(srv, "PUT", f"/presigned/{TRAIN_FILE}")
    assert rows_of(put.raw) == rows_of(chat.read_bytes())


def test_chat_rows_upload_unchanged(together_env, pinned_job_id, tmp_path):
    srv = together_env("lifecycle")
    chat = tmp_path / "chat.jsonl"
    shutil.copy(EXAMPLE_DATA / "chat.jsonl", chat)
    tunekit.finetune(chat, base_model="llama-3.1-8b-instruct", backend="together", hyperparameters={"epochs": 1})
    (put,) = sent(srv, "PUT", f"/presigned/{TRAIN_FILE}")
    assert put.raw == chat.read_bytes()
