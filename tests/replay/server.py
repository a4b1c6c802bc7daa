"""A local HTTP server that replays recorded provider exchanges, in order, to an official SDK.

Recording format (``tests/recordings/<provider>/<scenario>.json``)::

    {"provider": "openai", "notes": ["..."],
     "exchanges": [
       {"request": {"method": "POST", "path": "/v1/fine_tuning/jobs",
                    "json": {"model": "..."},          # optional: expected SUBSET of the JSON body
                    "query": {"limit": "10"}},         # optional: expected subset of the query string
        "response": {"status": 200, "headers": {"retry-after": "1"}, "json": {...}},
        "repeat": 2},                                  # optional: served exactly this many times in a row
       {"request": {"method": "POST", "path": "/v1/fine_tuning/jobs"}, "response": {"drop": true}}]}

Semantics:
- exchanges are served strictly in order; a request that does not match the next exchange's method + path
  (+ json/query subsets when given) gets HTTP 599 with a mismatch message, is appended to ``failures``
  and does NOT consume the exchange;
- ``"drop": true`` reads the request and closes the connection without a response;
- ``{server_url}`` in a response header value becomes the server's own URL (redirects to an upload URL);
- every request is kept in ``requests`` (method, path, query, headers minus credentials, json body or
  multipart parts' names/filenames/sizes, body size) for assertions such as "exactly one create".

A threaded stdlib ``http.server`` speaking HTTP/1.1 (keep-alive, Content-Length and chunked request bodies),
which is what httpx (sync and async) and aiohttp clients expect.
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Never keep these: a recorded request must be safe to print in a failing assertion.
SECRET_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization", "cookie"})


@dataclass
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, str | list[str]]
    headers: dict[str, str]
    body_size: int
    json: Any = None
    multipart: list[dict[str, Any]] | None = None  # [{"name", "filename", "content_type", "size", "value"|"sha256"}]
    raw: bytes = b""  # the body for non-JSON, non-multipart requests (e.g. upload parts are multipart)

    def multipart_field(self, name: str) -> dict[str, Any] | None:
        for part in self.multipart or []:
            if part["name"] == name:
                return part
        return None


@dataclass
class ReplayServer:
    url: str                                   # "http://127.0.0.1:<port>" (no path; add the SDK's prefix)
    requests: list[ReceivedRequest] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _next: int = 0
    _served_of_current: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _httpd: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def remaining(self) -> list[dict[str, Any]]:
        """Exchanges not (fully) served yet."""
        with self._lock:
            return self.exchanges[self._next:]

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r.method == method.upper() and r.path == path)

    def assert_done(self) -> None:
        """Every exchange served and no mismatched request."""
        assert not self.failures, f"replay mismatches: {self.failures}"
        left = [(e["request"]["method"], e["request"]["path"]) for e in self.remaining]
        assert not left, f"exchanges never requested: {left}"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- matching ---------------------------------------------------------------------------------------

    def _take(self, req: ReceivedRequest) -> dict[str, Any] | None:
        """Return the response spec for ``req`` (advancing the script) or None after recording a failure."""
        with self._lock:
            self.requests.append(req)
            if self._next >= len(self.exchanges):
                self.failures.append(f"{req.method} {req.path}: no exchange left to serve")
                return None
            exchange = self.exchanges[self._next]
            problem = _mismatch(exchange["request"], req)
            if problem:
                self.failures.append(f"{req.method} {req.path}: exchange #{self._next} {problem}")
                return None
            self._served_of_current += 1
            if self._served_of_current >= int(exchange.get("repeat", 1)):
                self._next += 1
                self._served_of_current = 0
            return exchange["response"]


def _mismatch(expected: dict[str, Any], req: ReceivedRequest) -> str | None:
    if expected["method"].upper() != req.method or expected["path"] != req.path:
        return f"expected {expected['method'].upper()} {expected['path']}"
    if "query" in expected:
        for key, value in expected["query"].items():
            if req.query.get(key) != value:
                return f"query {key!r}: expected {value!r}, got {req.query.get(key)!r}"
    if "json" in expected:
        problem = _subset_problem(expected["json"], req.json, "body")
        if problem:
            return problem
    if "multipart_fields" in expected:
        got = sorted(p["name"] for p in req.multipart or [])
        if sorted(expected["multipart_fields"]) != got:
            return f"multipart fields: expected {sorted(expected['multipart_fields'])}, got {got}"
    return None


def _subset_problem(expected: Any, actual: Any, where: str) -> str | None:
    """Is ``expected`` a recursive subset of ``actual`` (dict keys subset, lists/scalars equal)?"""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            if key not in actual:
                return f"{where}.{key}: missing"
            problem = _subset_problem(value, actual[key], f"{where}.{key}")
            if problem:
                return problem
        return None
    if expected != actual:
        return f"{where}: expected {expected!r}, got {actual!r}"
    return None


# -- body parsing -----------------------------------------------------------------------------------------

def _parse_multipart(body: bytes, content_type: str) -> list[dict[str, Any]]:
    boundary = None
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return []
    parts = []
    delimiter = b"--" + boundary.encode()
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        chunk = chunk.removeprefix(b"\r\n")
        head, _, content = chunk.partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = {}
        for piece in headers.get("content-disposition", "").split(";")[1:]:
            key, _, value = piece.strip().partition("=")
            disposition[key.lower()] = value.strip('"')
        part: dict[str, Any] = {
            "name": disposition.get("name", ""),
            "filename": disposition.get("filename"),
            "content_type": headers.get("content-type"),
            "size": len(content),
        }
        if part["filename"] is None:
            part["value"] = content.decode("utf-8", "replace")  # plain form field: keep the value
        else:
            part["sha256"] = hashlib.sha256(content).hexdigest()  # to check what was uploaded, not keep it
        parts.append(part)
    return parts


def _simplify_query(raw: str) -> dict[str, str | list[str]]:
    parsed = parse_qs(raw, keep_blank_values=True)
    return {k: v[0] if len(v) == 1 else v for k, v in parsed.items()}


def _make_handler(server: ReplayServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._read_body()
            split = urlsplit(self.path)
            content_type = self.headers.get("Content-Type", "")
            req = ReceivedRequest(
                method=self.command,
                path=split.path,
                query=_simplify_query(split.query),
                headers={k.lower(): v for k, v in self.headers.items() if k.lower() not in SECRET_HEADERS},
                body_size=len(body),
            )
            if content_type.startswith("multipart/form-data"):
                req.multipart = _parse_multipart(body, content_type)
            elif body:
                try:
                    req.json = json.loads(body)
                except ValueError:
                    req.raw = body
            response = server._take(req)
            if response is None:
                self._send(599, {}, {"error": {"message": f"replay mismatch: {server.failures[-1]}",
                                               "type": "replay_mismatch"}})
                return
            if response.get("drop"):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if "json" in response:
                payload = json.dumps(response["json"]).encode()
                headers = {"content-type": "application/json", **response.get("headers", {})}
            else:
                payload = response.get("body", "").encode()
                headers = dict(response.get("headers", {}))
            # "{server_url}" in a header value (e.g. a presigned upload Location) -> this server's URL.
            headers = {k: str(v).replace("{server_url}", server.url) for k, v in headers.items()}
            self._send(int(response.get("status", 200)), headers, payload)

        def _send(self, status: int, headers: dict[str, str], payload: Any) -> None:
            if not isinstance(payload, bytes):
                payload = json.dumps(payload).encode()
                headers = {"content-type": "application/json", **headers}
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    return Handler


def load_recording(recording: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(recording, dict):
        return copy.deepcopy(recording)
    return json.loads(Path(recording).read_text())


def start_replay_server(recording: str | Path | dict[str, Any]) -> ReplayServer:
    """Start serving ``recording`` (a path or an already-loaded dict) on 127.0.0.1 in a daemon thread."""
    data = load_recording(recording)
    server = ReplayServer(url="", exchanges=data["exchanges"], notes=list(data.get("notes", [])))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(server))
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    server._httpd = httpd
    server._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                      name="replay-server", daemon=True)
    server._thread.start()
    return server
