"""A stateful fake of the OpenAI or Together fine-tuning API whose job list shows a new job late.

Unlike a replay, it keeps jobs: a create makes a job (and may then drop the connection, so the client
never hears of it), the list shows a job only ``lag`` seconds after its creation, cancel cancels. Time
is virtual: the backend's ``sleep``/``monotonic`` are this provider's (``attach``), so a lag of minutes
runs in milliseconds. Job bodies are the recorded ones (tests/recordings), so the real SDKs parse them.

    fake = start_fake("openai", lag=5.0, drop_creates=1)
    backend = fake.attach(OpenAIBackend(base_url=fake.base_url, api_key="sk-test", ...))
"""

from __future__ import annotations

import copy
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.replay.fixtures import RECORDINGS


def _recorded(provider: str, name: str, method: str, path: str, index: int = -1) -> Any:
    exchanges = json.loads((RECORDINGS / provider / f"{name}.json").read_text())["exchanges"]
    hits = [e["response"]["json"] for e in exchanges if e["request"]["method"] == method
            and e["request"]["path"] == path and "json" in e["response"]]
    return copy.deepcopy(hits[index])


@dataclass
class FakeProvider:
    kind: str                       # "openai" | "together"
    lag: float                      # seconds before a new job shows in the list
    drop_creates: int = 0           # the first N creates make the job, then drop the connection
    echo: str | None = None         # if set, every request fails 400 with this text in the error message
    now: float = 0.0
    jobs: list[dict[str, Any]] = field(default_factory=list)
    creates: int = 0
    lists: int = 0
    cancelled: list[str] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _httpd: ThreadingHTTPServer | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return self.url + ("/v1" if self.kind == "openai" else "")

    # -- the virtual clock -----------------------------------------------------------------------------
    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def attach(self, backend: Any) -> Any:
        backend.sleep, backend.monotonic = self.sleep, self.monotonic
        return backend

    # -- state -------------------------------------------------------------------------------------------
    def add_job(self, tag: str | None, *, at: float | None = None, status: str | None = None) -> dict[str, Any]:
        """A job made on the provider (by a create, or by hand for a test), carrying ``tag`` (a tunekit id)."""
        n = len(self.jobs) + 1
        if self.kind == "openai":
            job = _recorded("openai", "dropped_create", "GET", "/v1/fine_tuning/jobs")["data"][0]
            job.update(id=f"ftjob-Fake{n:04d}", created_at=1795900000 + n, status=status or "queued",
                       metadata={"tunekit_job_id": tag} if tag else None)
        else:
            job = _recorded("together", "retry_500_create", "POST", "/v1/fine-tunes")
            job.update(id=f"ft-fake-{n:04d}", created_at=f"2026-11-28T10:00:{n:02d}.000Z", status=status or "pending",
                       suffix=tag or "other-run", model_output_name=f"acme/model-{tag or 'other-run'}-{n:04d}")
        self.jobs.append({"body": job, "at": self.now if at is None else at})
        return job

    def visible(self) -> list[dict[str, Any]]:
        return [j["body"] for j in self.jobs if self.now - j["at"] >= self.lag]

    def live(self) -> list[str]:
        done = ("cancelled", "succeeded", "failed", "completed", "error")
        return [j["body"]["id"] for j in self.jobs if j["body"]["status"] not in done]

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- requests -----------------------------------------------------------------------------------------
    def respond(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any] | None:
        """(status, JSON) for a request, or None to drop the connection."""
        jobs_path = "/v1/fine_tuning/jobs" if self.kind == "openai" else "/v1/fine-tunes"
        with self._lock:
            if self.echo is not None:
                return 400, {"error": {"message": f"invalid request: {self.echo}", "type": "invalid_request_error",
                                       "param": None, "code": None}}
            if method == "POST" and path == jobs_path:
                self.creates += 1
                tag = (body.get("metadata") or {}).get("tunekit_job_id") if self.kind == "openai" else body["suffix"]
                job = self.add_job(tag)
                return None if self.creates <= self.drop_creates else (200, job)
            if method == "GET" and path == jobs_path:
                self.lists += 1
                listed = self.visible()
                wanted = query.get("metadata[tunekit_job_id]")
                if wanted:
                    listed = [j for j in listed if (j.get("metadata") or {}).get("tunekit_job_id") == wanted[0]]
                listed = sorted(listed, key=lambda j: j["created_at"], reverse=True)  # newest first, as both do
                return 200, ({"object": "list", "data": listed, "has_more": False} if self.kind == "openai"
                             else {"data": listed})
            if method == "POST" and path.startswith(jobs_path + "/") and path.endswith("/cancel"):
                remote_id = path[len(jobs_path) + 1:-len("/cancel")]
                job = next(j["body"] for j in self.jobs if j["body"]["id"] == remote_id)
                job["status"] = "cancelled"
                self.cancelled.append(remote_id)
                return 200, job
            if self.kind == "together" and method == "GET" and path == "/v1/fine-tunes/models/limits":
                return 200, _recorded("together", "retry_500_create", "GET", path)
            if self.kind == "together" and method == "POST" and path == "/v1/fine-tunes/estimate-price":
                return 200, _recorded("together", "retry_500_create", "POST", path)
        return 404, {"error": {"message": f"fake provider: no route {method} {path}", "type": "not_found"}}


def start_fake(kind: str, *, lag: float, drop_creates: int = 0, echo: str | None = None) -> FakeProvider:
    fake = FakeProvider(kind=kind, lag=lag, drop_creates=drop_creates, echo=echo)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            split = urlsplit(self.path)
            answer = fake.respond(self.command, split.path, parse_qs(split.query), json.loads(raw) if raw else {})
            if answer is None:  # the job exists, but the client never hears of it
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status, payload = answer
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _handle

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    fake.url, fake._httpd = f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return fake
