"""The replay server itself, driven by the real openai SDK (sync httpx, async httpx) and raw httpx."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from tests.replay.fixtures import replay_server  # noqa: F401  (fixture)

openai = pytest.importorskip("openai")

JOB = {"id": "ftjob-1", "object": "fine_tuning.job", "status": "queued"}


def _script(*exchanges):
    return {"provider": "test", "exchanges": list(exchanges)}


def test_serves_in_order_and_records(replay_server):
    srv = replay_server(_script(
        {"request": {"method": "POST", "path": "/v1/fine_tuning/jobs", "json": {"model": "m"}},
         "response": {"status": 200, "json": JOB}},
        {"request": {"method": "GET", "path": "/v1/fine_tuning/jobs/ftjob-1"},
         "response": {"status": 200, "json": {**JOB, "status": "running"}}, "repeat": 2},
    ))
    client = openai.OpenAI(api_key="sk-secret", base_url=srv.url + "/v1", max_retries=0)
    created = client.fine_tuning.jobs.with_raw_response.create(model="m", training_file="file-1")
    assert created.http_response.json()["id"] == "ftjob-1"
    for _ in range(2):
        assert client.fine_tuning.jobs.with_raw_response.retrieve("ftjob-1").http_response.json()["status"] == "running"
    srv.assert_done()
    assert srv.requests[0].json == {"model": "m", "training_file": "file-1"}
    assert all("authorization" not in r.headers for r in srv.requests)
    assert "sk-secret" not in repr(srv.requests)


def test_mismatch_gets_599_and_is_recorded(replay_server):
    srv = replay_server(_script({"request": {"method": "GET", "path": "/v1/files/f"}, "response": {"json": {}}}))
    r = httpx.post(srv.url + "/v1/other", json={"a": 1})
    assert r.status_code == 599 and "replay mismatch" in r.text
    assert len(srv.failures) == 1 and len(srv.remaining) == 1
    with pytest.raises(AssertionError):
        srv.assert_done()


def test_json_subset_mismatch(replay_server):
    srv = replay_server(_script({"request": {"method": "POST", "path": "/x", "json": {"a": {"b": 1}}},
                                 "response": {"json": {}}}))
    assert httpx.post(srv.url + "/x", json={"a": {"b": 2}}).status_code == 599
    assert httpx.post(srv.url + "/x", json={"a": {"b": 1, "c": 3}}).status_code == 200
    assert not srv.remaining


def test_drop_closes_without_response(replay_server):
    srv = replay_server(_script({"request": {"method": "POST", "path": "/v1/fine_tuning/jobs"},
                                 "response": {"drop": True}}))
    client = openai.OpenAI(api_key="k", base_url=srv.url + "/v1", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.fine_tuning.jobs.create(model="m", training_file="file-1")
    assert srv.count("POST", "/v1/fine_tuning/jobs") == 1 and not srv.remaining


def test_multipart_field_names_and_sizes(replay_server):
    srv = replay_server(_script({"request": {"method": "POST", "path": "/v1/files",
                                             "multipart_fields": ["file", "purpose"]},
                                 "response": {"json": {"id": "file-1", "object": "file", "bytes": 5,
                                                       "created_at": 1, "filename": "t.jsonl",
                                                       "purpose": "fine-tune", "status": "processed"}}}))
    client = openai.OpenAI(api_key="k", base_url=srv.url + "/v1", max_retries=0)
    assert client.files.create(file=("t.jsonl", io.BytesIO(b"hello")), purpose="fine-tune").id == "file-1"
    (req,) = srv.requests
    assert req.multipart_field("file")["size"] == 5
    assert req.multipart_field("file")["filename"] == "t.jsonl"
    assert req.multipart_field("purpose")["value"] == "fine-tune"
    srv.assert_done()


def test_async_client_and_chunked_body(replay_server):
    srv = replay_server(_script(
        {"request": {"method": "GET", "path": "/v1/fine_tuning/jobs/ftjob-1"}, "response": {"json": JOB}},
        {"request": {"method": "POST", "path": "/raw"}, "response": {"status": 201, "body": "ok"}},
    ))

    async def go():
        client = openai.AsyncOpenAI(api_key="k", base_url=srv.url + "/v1", max_retries=0)
        job = await client.fine_tuning.jobs.with_raw_response.retrieve("ftjob-1")
        await client.close()

        def gen():
            yield b"abc"
            yield b"defg"

        r = httpx.post(srv.url + "/raw", content=gen())  # no length -> chunked transfer encoding
        return job.http_response.json(), r

    job, raw = asyncio.run(go())
    assert job["id"] == "ftjob-1" and raw.status_code == 201
    assert srv.requests[1].body_size == 7 and srv.requests[1].raw == b"abcdefg"
    srv.assert_done()
