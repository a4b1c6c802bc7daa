"""Fireworks backend end to end against recorded exchanges replayed to the official SDK (sync and async)."""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import tunekit
from tunekit._exceptions import AuthenticationError, BadRequestError, NotFoundError
from tunekit.job import FineTuneJob
from tunekit.schemas.job import JobStatus
from tunekit.store import default_store

from tests.conftest_fireworks import ACCOUNT, FAST, JOB_ID, REC, check_exchange, fw_env, replay_server  # noqa: F401

pytest.importorskip("fireworks")
pytestmark = pytest.mark.usefixtures("fw_env")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRAIN, VALID, PREF = (EXAMPLES / "data" / n for n in ("train.jsonl", "valid.jsonl", "preference.jsonl"))
SFT = f"/v1/accounts/{ACCOUNT}/supervisedFineTuningJobs"
NAME = f"accounts/{ACCOUNT}/supervisedFineTuningJobs/{JOB_ID}"


def load(name: str) -> dict:
    return json.loads((REC / f"{name}.json").read_text())


def finetune(srv, data=TRAIN, options=None, **kw):
    kw.setdefault("base_model", "llama-3.1-8b-instruct")
    return tunekit.finetune(data, backend="fireworks", base_url=srv.url, backend_options={**FAST, **(options or {})},
                            **kw)


def assert_sdk_shapes(srv):
    """What the SDK really sent fits the SDK's own request types."""
    problems = [p for r in srv.requests if r.json is not None
                for p in check_exchange(r.method, r.path, r.query, r.json, None, None)]
    assert not problems


def remote_job(srv, remote_id=NAME, status=JobStatus.RUNNING, raw="JOB_STATE_RUNNING"):
    """A stored job already on Fireworks (as after submit), with a backend pointed at ``srv``."""
    from tunekit.backends.fireworks.backend import FireworksBackend

    store = default_store()
    rec = store.create_job("fireworks", {"base_model": "qwen3-8b"}, {}, job_id=f"tk-remote-{uuid.uuid4().hex[:6]}")
    store.update_job(rec.id, remote_id=remote_id, status=status, raw_status=raw)
    return FineTuneJob(store.get_job(rec.id), store=store, backend=FireworksBackend(base_url=srv.url, **FAST))


def test_full_lifecycle(replay_server, tmp_path):
    srv = replay_server(REC / "sft_lifecycle.json")
    job = finetune(srv, validation_data=VALID, suffix="QA bot", adapter={"r": 16},
                   hyperparameters={"epochs": 2, "learning_rate": 1e-4, "batch_size": 8, "warmup_ratio": 0.1,
                                    "max_length": 4096})
    assert job.remote_id == NAME and job.status == JobStatus.QUEUED and job.raw_status == "JOB_STATE_CREATING"
    job.wait(poll_interval=0.01)
    srv.assert_done()
    assert_sdk_shapes(srv)
    assert job.status == JobStatus.SUCCEEDED and job.error is None
    assert job.result.model == f"accounts/{ACCOUNT}/models/qa-bot-{JOB_ID}"
    assert job.progress["percent"] == 100
    assert srv.count("POST", SFT) == 1
    # prompt/response rows were converted to chat before upload: the uploaded part is the chat file
    from tunekit.data.convert import convert_file

    convert_file(TRAIN, tmp_path / "chat.jsonl", "chat")
    upload = next(r for r in srv.requests if r.path.endswith("-train:upload")).multipart_field("file")
    assert upload["filename"] == f"{JOB_ID}-train.jsonl" and upload["size"] == (tmp_path / "chat.jsonl").stat().st_size
    create = next(r for r in srv.requests if r.path == SFT)
    assert create.query == {"supervisedFineTuningJobId": JOB_ID}
    assert create.json["learningRateWarmupSteps"] == 3  # ceil(0.1 x 2 epochs x ceil(92 / 8) steps)
    # events from polling: every Fireworks state change, progress, the deploy note; stored once each
    messages = [e.message for _, e in job.events()]
    for expected in ("JOB_STATE_CREATING -> JOB_STATE_RUNNING", "progress 40% (epoch 0)", "progress 90% (epoch 1)",
                     "JOB_STATE_RUNNING -> JOB_STATE_WRITING_RESULTS", "JOB_STATE_WRITING_RESULTS -> JOB_STATE_COMPLETED",
                     "must be deployed before inference"):
        assert sum(expected in msg for msg in messages) == 1, (expected, messages)


def test_full_lifecycle_async(replay_server, monkeypatch):
    from tunekit.backends.fireworks.backend import FireworksBackend

    made = []
    real = FireworksBackend.make_client
    monkeypatch.setattr(FireworksBackend, "make_client",
                        lambda self, *, async_: made.append(async_) or real(self, async_=async_))
    srv = replay_server(REC / "sft_lifecycle.json")
    job = finetune(srv, validation_data=VALID, suffix="QA bot", adapter={"r": 16},
                   hyperparameters={"epochs": 2, "learning_rate": 1e-4, "batch_size": 8, "warmup_ratio": 0.1,
                                    "max_length": 4096})
    asyncio.run(job.wait_async(poll_interval=0.01))
    srv.assert_done()
    assert job.status == JobStatus.SUCCEEDED and job.result.model.endswith(f"qa-bot-{JOB_ID}")
    assert any("JOB_STATE_WRITING_RESULTS" in e.message for _, e in job.events())
    assert made == [False, True]  # submit on the sync client, every poll on the async one


def test_dpo(replay_server):
    srv = replay_server(REC / "dpo_create.json")
    job = finetune(srv, PREF, method="dpo", adapter={"r": 8}, hyperparameters={"dpo_beta": 0.2})
    assert job.remote_id == f"accounts/{ACCOUNT}/dpoJobs/{JOB_ID}" and job.status == JobStatus.QUEUED
    job.wait(poll_interval=0.01)
    srv.assert_done()
    assert_sdk_shapes(srv)
    create = next(r for r in srv.requests if r.path.endswith("/dpoJobs"))
    assert create.query == {"dpoJobId": JOB_ID} and create.json["lossConfig"] == {"method": "DPO", "dpo": {"beta": 0.2}}
    assert job.status == JobStatus.SUCCEEDED and job.result.model == f"accounts/{ACCOUNT}/models/{JOB_ID}"
    upload = next(r for r in srv.requests if r.path.endswith(":upload")).multipart_field("file")
    assert upload["size"] == PREF.stat().st_size  # preference rows go as they are


def test_cancel(replay_server):
    srv = replay_server(REC / "cancel.json")
    job = finetune(srv)
    job.cancel()
    assert job.status == JobStatus.CANCELLING and job.raw_status == "JOB_STATE_CANCELLING"
    job.wait(poll_interval=0.01)
    srv.assert_done()
    assert job.status == JobStatus.CANCELLED


def test_cancel_async(replay_server):
    srv = replay_server(REC / "cancel.json")
    job = finetune(srv)

    async def go():
        await job.cancel_async()
        assert job.status == JobStatus.CANCELLING
        await job.wait_async(poll_interval=0.01)

    asyncio.run(go())
    srv.assert_done()
    assert job.status == JobStatus.CANCELLED


def test_failed_job_surfaces_the_fireworks_message(replay_server):
    srv = replay_server(REC / "failed.json")
    job = finetune(srv)
    job.wait(poll_interval=0.01)
    srv.assert_done()
    assert job.status == JobStatus.FAILED
    assert job.error == ("INVALID_ARGUMENT: Dataset validation failed: line 7: messages must alternate between user "
                         "and assistant")
    errors = [e for _, e in job.events() if e.level == "error"]
    assert errors and all("messages must alternate" in e.message for e in errors)


def test_400_is_a_bad_request_with_the_provider_message(replay_server):
    srv = replay_server(REC / "error_400.json")
    with pytest.raises(BadRequestError) as err:
        finetune(srv)
    srv.assert_done()
    assert "invalid base model: accounts/fireworks/models/nope is not tunable" in str(err.value)
    assert err.value.status_code == 400 and err.value.provider == "fireworks"
    [stored] = tunekit.list_jobs()
    assert stored.status == JobStatus.FAILED and "not tunable" in stored.error
    assert srv.count("POST", SFT) == 1  # a 400 is not retried


def test_401_is_an_authentication_error(replay_server):
    srv = replay_server(REC / "error_401.json")
    with pytest.raises(AuthenticationError, match="invalid API key"):
        finetune(srv)
    srv.assert_done()


def test_404_is_not_found(replay_server):
    srv = replay_server(REC / "error_404.json")
    job = remote_job(srv)
    with pytest.raises(NotFoundError, match="not found") as err:
        job.refresh()
    assert err.value.status_code == 404
    srv.assert_done()


def test_429_honours_retry_after(replay_server):
    srv = replay_server(REC / "rate_limit.json")
    job = remote_job(srv)
    started = time.monotonic()
    job.refresh()
    waited = time.monotonic() - started
    srv.assert_done()
    assert waited >= 0.95, waited
    assert job.status == JobStatus.RUNNING and job.progress["percent"] == 10


def test_500_on_create_looks_first_then_creates_once_more(replay_server):
    srv = replay_server(REC / "server_error_create.json")
    job = finetune(srv)
    srv.assert_done()
    assert job.status == JobStatus.QUEUED and job.remote_id == NAME
    calls = [(r.method, r.path) for r in srv.requests[-3:]]
    assert calls == [("POST", SFT), ("GET", f"{SFT}/{JOB_ID}"), ("POST", SFT)]


def test_dropped_create_does_not_create_a_second_job(replay_server):
    srv = replay_server(REC / "drop_create.json")
    job = finetune(srv)
    srv.assert_done()
    assert srv.count("POST", SFT) == 1
    assert job.remote_id == NAME and job.status == JobStatus.QUEUED


def test_409_means_an_earlier_attempt_won(replay_server):
    srv = replay_server(REC / "conflict.json")
    job = finetune(srv)
    srv.assert_done()
    assert not any(r.path.endswith(":upload") for r in srv.requests)  # the READY dataset is reused
    assert srv.count("POST", SFT) == 1 and job.status == JobStatus.RUNNING


class _SignedURLStore(BaseHTTPRequestHandler):
    """Stands in for the GCS signed URL: keeps every header (credentials included) and the body."""

    protocol_version = "HTTP/1.1"
    received: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def signed_url_server():
    _SignedURLStore.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SignedURLStore)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _SignedURLStore.received
    httpd.shutdown()
    httpd.server_close()


def test_big_files_go_through_a_signed_url_without_credentials(replay_server, signed_url_server, tmp_path):
    url, received = signed_url_server
    data = load("signed_upload")
    data["exchanges"][1]["response"]["json"]["filenameToSignedUrls"][f"{JOB_ID}-train.jsonl"] = url + "/bucket/o?sig=x"
    srv = replay_server(data)
    job = finetune(srv, options={"upload_limit": 100})  # any file above 100 bytes takes the signed-URL path
    srv.assert_done()
    assert job.status == JobStatus.QUEUED
    from tunekit.data.convert import convert_file

    convert_file(TRAIN, tmp_path / "chat.jsonl", "chat")
    expected = (tmp_path / "chat.jsonl").read_bytes()
    [(path, headers, body)] = received
    assert path == "/bucket/o?sig=x" and body == expected
    assert headers["x-goog-content-length-range"] == f"{len(expected)},{len(expected)}"
    assert headers["content-type"] == "application/octet-stream"
    assert not {"authorization", "x-api-key"} & set(headers)
    assert not any("fw-" in v for v in headers.values())
    sizes = next(r for r in srv.requests if r.path.endswith(":getUploadEndpoint")).json
    assert sizes == {"filenameToSize": {f"{JOB_ID}-train.jsonl": str(len(expected))}}


def test_upload_streams_the_file(replay_server, monkeypatch):
    """The upload reads the file in bounded chunks, never whole (memory must not grow with the file)."""
    import builtins

    from tunekit.backends.fireworks import upload

    reads: list = []

    class Watched:
        def __init__(self, f):
            self._f = f

        def read(self, size=-1):
            reads.append(size)
            return self._f.read(size)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    import io

    class WatchedIO(Watched, io.RawIOBase):  # httpx accepts io.IOBase file objects
        pass

    # `open` as the upload module looks it up (its globals before builtins): every file it opens is watched
    monkeypatch.setattr(upload, "open", lambda path, mode: WatchedIO(builtins.open(path, mode)), raising=False)
    srv = replay_server(REC / "quickstart.json")
    finetune(srv, hyperparameters={"epochs": 1}).wait(poll_interval=0.01)
    srv.assert_done()
    assert reads and all(isinstance(n, int) and 0 < n <= upload.CHUNK for n in reads), reads


def test_unknown_paused_and_deleted_states(replay_server):
    srv = replay_server(REC / "states.json")
    job = remote_job(srv)
    job.refresh()
    assert (job.status, job.raw_status) == (JobStatus.QUEUED, "JOB_STATE_PAUSED")
    job.refresh()
    assert (job.status, job.raw_status) == (JobStatus.UNKNOWN, "JOB_STATE_SOMETHING_NEW")
    job.refresh()
    assert job.status == JobStatus.CANCELLED and "deleted on Fireworks (JOB_STATE_DELETED)" in job.error
    srv.assert_done()


def test_resume_a_paused_job(replay_server):
    srv = replay_server(REC / "resume.json")
    job = remote_job(srv, status=JobStatus.QUEUED, raw="JOB_STATE_PAUSED")
    job.resume()
    srv.assert_done()
    assert (job.status, job.raw_status) == (JobStatus.QUEUED, "JOB_STATE_PENDING")


def test_a_job_without_a_fireworks_id_cannot_be_cancelled(replay_server):
    from tunekit._exceptions import JobStateError

    srv = replay_server({"provider": "fireworks", "notes": ["no request expected"], "exchanges": []})
    job = remote_job(srv, remote_id=None, status=JobStatus.UNKNOWN, raw=None)
    with pytest.raises(JobStateError, match="no remote job is attached") as err:  # FineTuneJob checks first
        job.cancel()
    assert "reconcile" in err.value.hint
    assert srv.requests == []


def test_early_stopped_is_a_success_with_a_warning(replay_server):
    srv = replay_server(REC / "early_stopped.json")
    job = remote_job(srv)
    job.refresh()
    srv.assert_done()
    assert job.status == JobStatus.SUCCEEDED and job.result.model == f"accounts/{ACCOUNT}/models/{JOB_ID}"
    assert any(e.level == "warning" and "early" in e.message for _, e in job.events())


def test_reconcile_finds_the_job_by_its_client_chosen_id(replay_server):
    srv = replay_server({"provider": "fireworks", "notes": ["GET by the id derived from the tunekit id"],
                         "exchanges": load("drop_create")["exchanges"][-1:]})
    store = default_store()
    rec = store.create_job("fireworks", {"base_model": "qwen3-8b"}, {})  # crashed before the reply was stored
    [job] = tunekit.reconcile(rec.id, base_url=srv.url)
    srv.assert_done()
    assert job.remote_id == NAME and job.status == JobStatus.QUEUED


def test_quickstart_example_runs_against_the_recording(replay_server, monkeypatch, capsys):
    srv = replay_server(REC / "quickstart.json")
    monkeypatch.setenv("FIREWORKS_BASE_URL", srv.url)
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--backend", "fireworks", "--data", str(TRAIN)])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    srv.assert_done()
    assert f"succeeded accounts/{ACCOUNT}/models/{JOB_ID}" in capsys.readouterr().out


def test_canary_key_never_stored_logged_or_shown(replay_server, monkeypatch, caplog, tunekit_home):
    import logging

    canary = f"fw-canary-{uuid.uuid4()}"
    monkeypatch.setenv("FIREWORKS_API_KEY", canary)
    monkeypatch.setenv("FIREWORKS_LOG", "debug")
    caplog.set_level(logging.DEBUG)
    srv = replay_server(REC / "sft_lifecycle.json")
    job = finetune(srv, validation_data=VALID, suffix="QA bot", adapter={"r": 16},
                   hyperparameters={"epochs": 2, "learning_rate": 1e-4, "batch_size": 8, "warmup_ratio": 0.1,
                                    "max_length": 4096})
    job.wait(poll_interval=0.01)
    srv.assert_done()
    # a provider error that echoes the key is masked
    leak = replay_server({"provider": "fireworks", "notes": ["an error echoing the key"], "exchanges": [
        {"request": {"method": "GET", "path": f"{SFT}/{JOB_ID}"},
         "response": {"status": 401, "json": {"code": 16, "message": f"bad key {canary}", "details": []}}}]})
    with pytest.raises(AuthenticationError) as err:
        remote_job(leak).refresh()
    assert canary not in str(err.value) and "***" in str(err.value)
    assert all(r.headers.get("authorization") is None for r in srv.requests)
    texts = [canary not in rec.getMessage() for rec in caplog.records]
    assert caplog.records and all(texts)
    for path in tunekit_home.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    assert all(canary not in e.message and canary not in json.dumps(e.data) for _, e in job.events())
    assert canary not in repr(job.backend) and canary not in repr(job)
