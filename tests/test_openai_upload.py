"""OpenAI uploads: Files API with an open handle; the Uploads API (lowered threshold) streaming each part in
small reads; waiting for file processing; cancelling an abandoned Upload."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest

pytest.importorskip("openai")

from tests.conftest_openai import CHAT, finetune, load, pin_job_id, spec_problems  # noqa: E402,F401
from tests.replay.fixtures import replay_server  # noqa: E402,F401
from tunekit import _exceptions as errors  # noqa: E402
from tunekit.backends.openai import upload as openai_upload  # noqa: E402
from tunekit.backends.openai.backend import OpenAIBackend  # noqa: E402
from tunekit.schemas.job import JobStatus  # noqa: E402
from tunekit.store import default_store  # noqa: E402

HTTP_CHUNK = 64 * 1024  # the HTTP client's multipart read size


@pytest.fixture
def big_chat(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(340):
            row = {"messages": [{"role": "user", "content": f"{i} " + "x" * 2000},
                                {"role": "assistant", "content": "y"}]}
            f.write(json.dumps(row) + "\n")
    return path


def test_large_file_goes_through_uploads_api_in_streamed_parts(replay_server, pin_job_id, monkeypatch, big_chat):
    data = big_chat.read_bytes()
    size = len(data)
    part = math.ceil(size / 3)
    assert part > 2 * HTTP_CHUNK  # so a part streamed whole would show up as one big read
    monkeypatch.setattr(OpenAIBackend, "files_api_max_bytes", 100_000)  # instead of 512 MB
    monkeypatch.setattr(OpenAIBackend, "upload_part_bytes", part)
    reads: list[tuple[int, int]] = []
    real_read = openai_upload.FileWindow.read

    def spy(self, size=-1):
        out = real_read(self, size)
        reads.append((-1 if size is None else size, len(out)))
        return out

    monkeypatch.setattr(openai_upload.FileWindow, "read", spy)
    srv = replay_server(load("large_upload"))
    pin_job_id("tk-openai-big")
    job = finetune(srv, big_chat)
    assert job.remote_id == "ftjob-Big0001"
    srv.assert_done()

    create = srv.requests[0]
    assert create.json == {"bytes": size, "filename": "tunekit-tk-openai-big-train.jsonl",
                           "mime_type": "text/jsonl", "purpose": "fine-tune"}
    parts = [r.multipart_field("data") for r in srv.requests[1:4]]
    slices = [data[i:i + part] for i in range(0, size, part)]
    assert [p["size"] for p in parts] == [len(s) for s in slices]
    assert [p["sha256"] for p in parts] == [hashlib.sha256(s).hexdigest() for s in slices]
    complete = srv.requests[4].json
    assert complete == {"part_ids": ["part_0", "part_1", "part_2"], "md5": hashlib.md5(data).hexdigest()}
    assert srv.requests[5].json["training_file"] == "file-big01"
    # Streaming: every read of a part asked for at most one HTTP chunk, and all bytes went through.
    assert reads and all(0 <= asked <= HTTP_CHUNK for asked, _ in reads), sorted(set(reads))[-3:]
    assert sum(got for _, got in reads) == size
    assert spec_problems(srv) == []


def test_small_file_is_sent_as_an_open_handle(replay_server, pin_job_id, monkeypatch):
    seen = []
    real = openai_upload.create_file

    def spy(client, file):
        seen.append(file)
        return real(client, file)

    monkeypatch.setattr(openai_upload, "create_file", spy)
    srv = replay_server(load("cancel"))
    pin_job_id("tk-openai-cancel")
    finetune(srv, CHAT)
    ((name, handle),) = seen
    assert name == "tunekit-tk-openai-cancel-train.jsonl"
    assert hasattr(handle, "read") and handle.closed  # a file object (streamed), closed after the upload
    assert srv.requests[0].multipart_field("file")["size"] == CHAT.stat().st_size


def _processing_script(final: dict) -> dict:
    rec = load("cancel")
    upload = rec["exchanges"][0]
    upload["response"]["json"]["status"] = "uploaded"
    poll = {"request": {"method": "GET", "path": "/v1/files/file-train01"},
            "response": {"status": 200, "json": dict(upload["response"]["json"])}}
    done = copy.deepcopy(poll)
    done["response"]["json"].update(final)
    rest = rec["exchanges"][1:2] if final["status"] == "processed" else []
    return {"provider": "openai", "exchanges": [upload, poll, done, *rest]}


def test_waits_until_the_file_is_processed(replay_server, pin_job_id, monkeypatch):
    monkeypatch.setattr(OpenAIBackend, "file_poll_seconds", 0.0)
    srv = replay_server(_processing_script({"status": "processed"}))
    pin_job_id("tk-openai-cancel")
    job = finetune(srv, CHAT)
    assert job.status is JobStatus.QUEUED
    assert [r.method for r in srv.requests] == ["POST", "GET", "GET", "POST"]
    srv.assert_done()
    assert spec_problems(srv) == []


def test_file_processing_error_stops_before_create(replay_server, pin_job_id, monkeypatch):
    monkeypatch.setattr(OpenAIBackend, "file_poll_seconds", 0.0)
    srv = replay_server(_processing_script({"status": "error", "status_details": "Invalid file format."}))
    pin_job_id("tk-openai-cancel")
    with pytest.raises(errors.APIError, match="Invalid file format"):
        finetune(srv, CHAT)
    srv.assert_done()  # no create request was made
    assert default_store().get_job("tk-openai-cancel").status is JobStatus.FAILED


def test_failed_part_cancels_the_upload(replay_server, pin_job_id, monkeypatch, big_chat):
    monkeypatch.setattr(OpenAIBackend, "files_api_max_bytes", 100_000)
    rec = load("large_upload")
    create, first_part = rec["exchanges"][0], rec["exchanges"][1]
    failing = copy.deepcopy(first_part)
    failing["response"] = {"status": 400, "json": {"error": {"message": "Part too large", "type":
                                                             "invalid_request_error", "param": None, "code": None}}}
    cancelled = dict(create["response"]["json"], status="cancelled")
    srv = replay_server({"provider": "openai", "exchanges": [
        create, failing,
        {"request": {"method": "POST", "path": "/v1/uploads/upload_big01/cancel"},
         "response": {"status": 200, "json": cancelled}}]})
    pin_job_id("tk-openai-big")
    with pytest.raises(errors.BadRequestError, match="Part too large"):
        finetune(srv, big_chat)
    srv.assert_done()
    assert spec_problems(srv) == []
