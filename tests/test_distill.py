"""tunekit distill: answers of a live OpenAI-compatible chat endpoint become validated chat rows; bounded
concurrency, the one retry policy, an estimate before the first call, and resume without duplicates.

The recorded exchange (tests/recordings/openai/distill_chat.json) runs one request at a time (the replay
server serves in order); concurrency and interruption run against a small chat server below that answers
from the prompt, checking every request and response against OpenAI's spec."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")

from tests.conftest import EXAMPLES  # noqa: E402
from tests.conftest_openai import MODEL, RECORDINGS, fast_policy  # noqa: E402
from tests.replay.fixtures import replay_server  # noqa: E402,F401
from tests.replay.spec_check import check_server, load_provider_spec  # noqa: E402
from tunekit import _exceptions as errors  # noqa: E402

FT = f"ft:{MODEL}:org-tunekit:sqlbot:AbC123xy"
TRAIN = EXAMPLES / "data" / "train.jsonl"
CHAT = EXAMPLES / "data" / "chat.jsonl"


def _spec():
    try:
        return load_provider_spec("openai")
    except pytest.skip.Exception:  # tests/test_openai_spec.py reports the missing spec
        return None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ChatServer:
    """Answers POST /v1/chat/completions with "A: <last user message>"; tracks requests in flight;
    ``fail_after`` makes every request after the first N answer 400 (not retryable)."""

    def __init__(self, delay: float = 0.05, fail_after: int | None = None) -> None:
        self.delay, self.fail_after = delay, fail_after
        self.asked: list[str] = []
        self.problems: list[str] = []
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        self.spec = _spec()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def _answer(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            n = len(self.asked)
            self.asked.append(body["messages"][-1]["content"])
        try:
            time.sleep(self.delay)
            if self.fail_after is not None and n >= self.fail_after:
                return 400, {"error": {"message": "This model is no longer available", "type": "invalid_request_error",
                                       "param": "model", "code": "model_not_found"}}
            return 200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1795900000,
                         "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "A: " + body["messages"][-1]["content"],
                                     "refusal": None}}]}
        finally:
            with self.lock:
                self.in_flight -= 1

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server._answer(body)
                if server.spec is not None:
                    with server.lock:
                        server.problems += server.spec.request_problems("POST", self.path, json=body)
                        server.problems += server.spec.response_problems("POST", self.path, status, json=payload,
                                                                         error_schema="ErrorResponse")
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    started = []

    def start(**kw):
        started.append(ChatServer(**kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _distill(url, prompts, out, **kw):
    from tunekit.data.distill import distill

    kw.setdefault("retry_policy", fast_policy())
    return distill(FT, prompts, out, base_url=url, api_key="sk-test", **kw)


def test_recorded_exchange_retry_estimate_and_rejects(replay_server, tmp_path):
    srv = replay_server(RECORDINGS / "distill_chat.json")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in TRAIN.read_text().splitlines()[:3]))
    seen = []

    def on_estimate(est):
        seen.append((str(est), len(srv.requests)))  # before any request

    report = _distill(srv.url + "/v1", prompts, tmp_path / "out.jsonl", concurrency=1, on_estimate=on_estimate)
    srv.assert_done()
    spec = _spec()
    if spec is not None:
        assert check_server(spec, srv, error_schema="ErrorResponse") == []
    (text, requests_before), = seen
    assert requests_before == 0 and "3 requests" in text and "at $0.3/$1.2 per 1M" in text
    assert report.written == 2 and report.validation.valid and report.validation.rows == 2
    assert [r["messages"] for r in _rows(tmp_path / "out.jsonl")] == [
        [{"role": "user", "content": "reverse: dog star box"},
         {"role": "assistant", "content": "box star dog (distilled)"}],
        [{"role": "user", "content": "capital of Spain?"}, {"role": "assistant", "content": "Madrid (distilled)"}]]
    assert report.rejected == [
        {"line": 3, "reason": "answer cut at max_tokens (finish_reason=length): raise --max-tokens"}]
    assert _rows(tmp_path / "out.jsonl.rejected.jsonl") == report.rejected


def test_bounded_concurrency_every_row_kind(chat_server, tmp_path):
    srv = chat_server()
    report = _distill(srv.url, CHAT, tmp_path / "out.jsonl", concurrency=3)
    assert srv.problems == [] and srv.peak == 3  # overlapping, never more than asked
    rows = _rows(tmp_path / "out.jsonl")
    assert report.written == len(rows) == len(_rows(CHAT)) and report.validation.valid
    for row in rows:  # the prompt is the conversation before the last assistant turn, kept as it was
        assert row["messages"][-1] == {"role": "assistant", "content": "A: " + row["messages"][-2]["content"]}
    pref = _distill(srv.url, EXAMPLES / "data" / "preference.jsonl", tmp_path / "pref.jsonl", concurrency=2)
    assert pref.written == 40 and srv.peak == 3


def test_interrupted_run_resumes_without_duplicates(chat_server, tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = _rows(TRAIN)
    broken = chat_server(fail_after=30)
    with pytest.raises(errors.BadRequestError) as info:
        _distill(broken.url, TRAIN, out, concurrency=4)
    assert "resumes" in info.value.hint
    kept = _rows(out)
    assert 30 - 4 < len(kept) <= 30 < len(prompts)  # answers in flight when it stopped were still written
    with open(out, "a") as f:  # and a kill mid-write leaves a torn last line
        f.write('{"messages": [{"role": "user", "content": "rev')
    healthy = chat_server()
    seen = []
    report = _distill(healthy.url, TRAIN, out, concurrency=4, on_estimate=seen.append)
    assert seen[0].requests == len(prompts) - len(kept) == report.written
    assert report.resumed == len(kept)
    assert len(healthy.asked) == len(prompts) - len(kept)  # nothing asked twice
    rows = _rows(out)
    assert report.validation.valid and len(rows) == len(prompts)
    asked = sorted(r["messages"][0]["content"] for r in rows)
    assert asked == sorted(p["prompt"] for p in prompts)  # complete, and each prompt once
    again = _distill(healthy.url, TRAIN, out)
    assert again.written == 0 and len(_rows(out)) == len(prompts)


def test_default_prompts_come_from_the_imported_job(tmp_path):
    from tunekit.data.distill import distill
    from tunekit.store import default_store

    store = default_store()
    job = store.create_job("openai", {"base_model": MODEL}, {"train": {"path": str(TRAIN), "sha256": "x"}})
    store.add_adapter(backend="openai", location=FT, job_id=job.id, info={})
    report = distill(FT, None, tmp_path / "out.jsonl", estimate_only=True, api_key="sk-test")
    assert report.estimate.requests == len(_rows(TRAIN)) and not (tmp_path / "out.jsonl").exists()
    with pytest.raises(errors.ConfigError, match="no recorded job produced"):
        distill("ft:other", None, tmp_path / "out.jsonl", estimate_only=True)


def test_cli_estimate_only(tmp_path, capsys):
    from tunekit.cli.main import main

    assert main(["distill", "--model", "my-model", "--prompts", str(TRAIN), "--out", str(tmp_path / "o.jsonl"),
                 "--estimate-only", "--price", "1,2"]) == 0
    err = capsys.readouterr().err
    assert "92 requests" in err and "at $1/$2 per 1M tokens" in err


def test_killed_run_resumes_without_duplicates(chat_server, tmp_path):
    """kill -9 the CLI mid-run, run it again: every prompt answered once in the output, none lost."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    srv = chat_server(delay=0.1)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tunekit.cli.main", "distill", "--model", FT, "--prompts", str(TRAIN),
           "--out", str(out), "--base-url", srv.url, "--concurrency", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "estimate: 92 requests" in proc.stderr.read().decode()
    kept = len(out.read_text().splitlines())
    assert 5 <= kept < 92
    report = _distill(srv.url, TRAIN, out, concurrency=4)
    rows = _rows(out)
    assert report.validation.valid and len(rows) == 92
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(p["prompt"] for p in _rows(TRAIN))
    assert len(srv.asked) <= 92 + 2  # only the answers in flight at the kill were asked again


def test_at_most_concurrency_prompts_are_asked_and_unwritten(chat_server, tmp_path, monkeypatch):
    """Prompts are asked through a window of `concurrency`: while the writer is slow, no more calls start, so a
    kill can only ever lose (and a resume re-ask) that many answers."""
    from tunekit.data import distill as mod

    srv = chat_server(delay=0.0)  # answers come back at once; the writing side is the slow one
    out = tmp_path / "out.jsonl"
    gaps = []
    real_row = mod._row

    def slow_row(prompt, completion):
        written = len(out.read_text().splitlines()) if out.exists() else 0
        gaps.append(len(srv.asked) - written)  # asked so far, minus answers already in the file
        time.sleep(0.05)
        return real_row(prompt, completion)

    monkeypatch.setattr(mod, "_row", slow_row)
    report = _distill(srv.url, TRAIN, out, concurrency=3)
    assert report.written == 92 and len(srv.asked) == 92
    assert max(gaps) <= 3, gaps
