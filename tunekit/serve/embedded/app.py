"""The embedded OpenAI-compatible server (FastAPI): routes, auth, SSE streaming, adapter load/unload.

Security defaults: binds 127.0.0.1; with ``api_key`` every route but ``/health`` needs
``Authorization: Bearer <key>``; adapters load only from the paths given at start, the adapter
registry, or directories listed in ``allowed_adapter_dirs`` (anything else is a 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.requests import Request  # module level: FastAPI resolves route annotations from here

from ..._exceptions import ConfigError, TunekitError
from ...adapters.resolve import registered_at, registry_entry, resolve_adapter
from .engine import Engine
from .requests import GenRequest, SamplingParams
from .protocol import (
    APIErrorResponse,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    chat_body,
    completion_body,
    model_card,
    new_id,
    usage,
)

log = logging.getLogger("tunekit.serve")


class _Access:
    """Which adapter directories a runtime load request may name (start paths, registry, allowed dirs)."""

    def __init__(self, start: dict[str, Path], dirs: tuple[str | os.PathLike[str], ...]) -> None:
        self.start = dict(start)
        self.dirs = [Path(d).expanduser().resolve() for d in dirs]

    def path_for(self, name: str, lora_path: str | None) -> Path:
        if not lora_path:  # a name we already know: given at start, or in the registry
            known = self.start.get(name) or _registry_location(name)
            if known is None:
                raise APIErrorResponse(400, "Both 'lora_name' and 'lora_path' must be provided.", param="lora_path")
            return known
        path = Path(lora_path).expanduser()
        if not path.exists():
            known = _registry_location(lora_path)  # a registry id or name given as the path
            if known is not None:
                return known
        real = path.resolve()
        if (real in {p.resolve() for p in self.start.values()}
                or any(real == d or d in real.parents for d in self.dirs)
                or _is_registered(real)):
            return path
        raise APIErrorResponse(
            403, f"loading adapters from {lora_path!r} is not allowed: only adapters given at start, registered "
                 "adapters (`tunekit adapters list`) or those under allowed_adapter_dirs can be loaded",
            type="permission_error", param="lora_path", code="adapter_path_not_allowed")


class _BearerAuth:
    """Every route but /health needs ``Authorization: Bearer <key>``.

    Plain ASGI, not ``@app.middleware("http")``: that wrapper hides the client's disconnect from the
    routes, and a non-streaming route watches for it to cancel its rows.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                from starlette.responses import JSONResponse

                body = APIErrorResponse(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key").body()
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _registry_location(key: str) -> Path | None:
    try:
        record = registry_entry(key)
    except TunekitError:  # an unusable store: start paths and allowed dirs can still be loaded
        return None
    return Path(record.location).expanduser() if record else None


def _is_registered(path: Path) -> bool:
    try:
        return registered_at(path) is not None
    except TunekitError:
        return False


def create_app(base_model: str | os.PathLike[str], adapters: dict[str, str | os.PathLike[str]] | None = None, *,
               max_loras: int = 4, api_key: str | None = None, device: str | None = None, dtype: str | None = None,
               served_model_name: str | None = None, allowed_adapter_dirs: tuple[str, ...] = (),
               max_cpu_loras: int | None = None, max_lora_rank: int | None = None, max_batch_size: int = 32,
               batch_window_ms: float = 2.0, max_request_rows: int = 16, decode: str = "auto", kernels: str = "auto"):
    """Build the app and load the base once. ``adapters`` maps served names to directories or registry keys.

    ``max_request_rows`` caps the sequences one request may ask for (prompts x n), so no single
    client can fill the batch for everyone else. ``decode`` picks the decode step: ``auto`` (CUDA graphs over a
    static KV cache on a GPU, eager elsewhere), ``graphs``, ``static`` or ``eager`` (see docs/serving.md);
    ``kernels`` the fused kernels of the base: ``auto`` (Liger's on a GPU when installed), ``liger`` or ``off``.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    start = {name: resolve_adapter(ref)[0] for name, ref in (adapters or {}).items()}
    engine = Engine(base_model, start, max_loras=max_loras, device=device, dtype=dtype, max_cpu_loras=max_cpu_loras,
                    max_lora_rank=max_lora_rank, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                    decode=decode, kernels=kernels)
    base_name = served_model_name or str(base_model)
    access = _Access(start, tuple(allowed_adapter_dirs))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title="tunekit embedded server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine = engine

    # -- errors & auth ------------------------------------------------------------------------------
    @app.exception_handler(APIErrorResponse)
    async def _api_error(_req: Request, exc: APIErrorResponse):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = "request body is not valid JSON" if first.get("type") == "json_invalid" else first.get("msg")
        return JSONResponse(APIErrorResponse(400, f"{'.'.join(loc) or 'body'}: {msg}",
                                             param=".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        return JSONResponse(APIErrorResponse(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(APIErrorResponse(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                            status_code=500)

    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    def resolve_model(model: str) -> str | None:
        if model == base_name:
            return None
        if model in engine.adapters():
            return model
        raise APIErrorResponse(404, f"The model '{model}' does not exist. Served: "
                                    f"{', '.join([base_name, *engine.adapters()])}",
                               param="model", code="model_not_found")

    # -- routes -------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        data = [model_card(base_name, str(base_model), None)]
        data += [model_card(n, str(p), base_name) for n, p in engine.adapters().items()]
        return {"object": "list", "data": data}

    @app.get("/tunekit/stats")
    async def stats():
        return engine.stats()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        name = body.lora_name.strip()
        if not name:
            raise APIErrorResponse(400, "Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if name == base_name or name in engine.adapters():
            raise APIErrorResponse(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            path = access.path_for(name, body.lora_path)
            await run_in_threadpool(engine.add_adapter, name, path)
        except ConfigError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            raise APIErrorResponse(400, f"{exc}{hint}", param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        if not body.lora_name:
            raise APIErrorResponse(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                                   param="lora_name")
        try:
            engine.remove_adapter(body.lora_name)
        except KeyError:
            raise APIErrorResponse(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                                   param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def check_rows(n_prompts: int, n: int) -> None:
        if n_prompts * n > max_request_rows:
            raise APIErrorResponse(
                400, f"this request asks for {n_prompts} prompt(s) x n={n} = {n_prompts * n} completions; at most "
                     f"{max_request_rows} per request: split it into several requests",
                param="prompt" if n_prompts > 1 else "n")

    def check_chars(chars: int, param: str) -> None:
        # Refused before tokenizing: a huge text would hold a worker and memory only to be refused after.
        if chars > engine.max_prompt_chars:
            raise APIErrorResponse(
                400, f"This model's maximum context length is {engine.max_model_len} tokens; the {param} has "
                     f"{chars} characters, more than any text of {engine.max_model_len} tokens can have.",
                param=param, code="context_length_exceeded")

    def encode_all(raw: list[str | list[int]]) -> list[list[int]]:
        return [engine.encode(p) if isinstance(p, str) else list(p) for p in raw]

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.check_fields()
        adapter = resolve_model(req.model)
        raw = req.prompts()
        check_rows(len(raw), req.n)
        check_chars(max((len(p) for p in raw if isinstance(p, str)), default=0), "prompt")
        prompts = await run_in_threadpool(encode_all, raw)  # CPU work off the event loop
        params = _params(req, req.max_tokens or 16, prompts, engine.max_model_len)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):  # would fail the whole batch, not just this one
            raise APIErrorResponse(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        rid = new_id("cmpl")
        run = _Run(engine, rid, adapter, prompts, params, req.n, req.seed)
        n_prompt = sum(len(p) for p in prompts)
        if req.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                async for i, kind, payload in run.events():
                    if kind == "delta":
                        choice = {"index": i, "text": payload, "logprobs": None, "finish_reason": None}
                    else:
                        choice = {"index": i, "text": "", "logprobs": None, "finish_reason": payload}
                    yield completion_body(rid, req.model, [choice], None, chunk=True)
                if req.include_usage:
                    yield completion_body(rid, req.model, [], usage(n_prompt, run.completion_tokens), chunk=True)
            return StreamingResponse(_sse(chunks(), run), media_type="text/event-stream")
        await run.wait(request)
        choices = [{"index": i, "text": run.text[i], "logprobs": None, "finish_reason": run.finish[i]}
                   for i in range(run.rows)]
        return completion_body(rid, req.model, choices, usage(n_prompt, run.completion_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        req.check_fields()
        adapter = resolve_model(req.model)
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIErrorResponse(400, "the base model's tokenizer has no chat template; use /v1/completions",
                                   param="messages")
        check_rows(1, req.n)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        check_chars(sum(len(m["content"]) for m in messages), "messages")

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
                raise APIErrorResponse(400, f"chat template error: {exc}", param="messages") from None
            return tok(text, add_special_tokens=False)["input_ids"]

        prompt = await run_in_threadpool(render)  # CPU work off the event loop
        limit = req.max_completion_tokens or req.max_tokens or max(1, engine.max_model_len - len(prompt))
        params = _params(req, limit, [prompt], engine.max_model_len)
        rid = new_id("chatcmpl")
        run = _Run(engine, rid, adapter, [prompt], params, req.n, req.seed)
        if req.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for i in range(run.rows):
                    yield chat_body(rid, req.model, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}], None, chunk=True)
                async for i, kind, payload in run.events():
                    if kind == "delta":
                        choice = {"index": i, "delta": {"content": payload}, "logprobs": None, "finish_reason": None}
                    else:
                        choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": payload}
                    yield chat_body(rid, req.model, [choice], None, chunk=True)
                if req.include_usage:
                    yield chat_body(rid, req.model, [], usage(len(prompt), run.completion_tokens), chunk=True)
            return StreamingResponse(_sse(chunks(), run), media_type="text/event-stream")
        await run.wait(request)
        choices = [{"index": i, "message": {"role": "assistant", "content": run.text[i]}, "logprobs": None,
                    "finish_reason": run.finish[i]} for i in range(run.rows)]
        return chat_body(rid, req.model, choices, usage(len(prompt), run.completion_tokens))

    return app


def _params(req: Any, max_tokens: int, prompts: list[list[int]], max_len: int) -> SamplingParams:
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise APIErrorResponse(400, "prompt is empty after tokenization", param="prompt")
    if longest + max_tokens > max_len:
        raise APIErrorResponse(
            400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                 f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion).",
            param="max_tokens", code="context_length_exceeded")
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, stop=req.stop_list(), seed=req.seed)


_DISCONNECT_POLL_S = 0.1  # how soon a disconnected non-streaming client frees its batch rows


class _Run:
    """The rows (prompt × n) of one HTTP request, bridged from the scheduler thread into asyncio."""

    def __init__(self, engine: Engine, rid: str, adapter: str | None, prompts: list[list[int]],
                 params: SamplingParams, n: int, seed: int | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self.rows = len(prompts) * n
        self.text = [""] * self.rows
        self.finish: list[str | None] = [None] * self.rows
        self.completion_tokens = 0
        self._reqs: list[GenRequest] = []
        for pi, ids in enumerate(prompts):
            for j in range(n):
                p = params if seed is None or j == 0 else SamplingParams(**{**params.__dict__, "seed": seed + j})
                self._reqs.append(GenRequest(ids, adapter, p, self._sink, index=pi * n + j, request_id=rid))
        try:
            for r in self._reqs:
                engine.submit(r)
        except KeyError:  # the adapter was unloaded between lookup and submit
            self.cancel()
            raise APIErrorResponse(404, f"The model '{adapter}' does not exist.", param="model",
                                   code="model_not_found") from None

    def _sink(self, index: int, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, payload))
        except RuntimeError:  # the event loop is gone (server stopping)
            pass

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """Deltas and finish reasons, in order, until every row is done; an engine error raises."""
        remaining = self.rows
        while remaining:
            i, kind, payload = await self.queue.get()
            if kind == "error":
                self.cancel()
                raise APIErrorResponse(500, f"generation failed: {payload}")
            if kind == "delta":
                self.text[i] += payload
                yield i, kind, payload
            else:
                reason, n_tokens = payload
                self.finish[i] = reason
                self.completion_tokens += n_tokens
                remaining -= 1
                yield i, "done", reason

    async def wait(self, request: Any) -> None:
        """Collect every row; if the client disconnects first, cancel the rows (nobody will read them)."""
        async def drain() -> None:
            async for _ in self.events():
                pass

        task = asyncio.ensure_future(drain())
        try:
            while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    log.info("client disconnected: cancelled %d row(s) of %s", self.rows, self._reqs[0].request_id)
                    raise APIErrorResponse(499, "client closed the request", code="client_closed_request")
            task.result()
        finally:
            task.cancel()
            self.cancel()

    def cancel(self) -> None:
        for r in self._reqs:
            r.cancel()


async def _sse(chunks: AsyncIterator[dict[str, Any]], run: _Run) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except APIErrorResponse as exc:  # headers are sent: report in-band, as vLLM does
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        run.cancel()  # client gone or finished: free the batch rows
    yield "data: [DONE]\n\n"
