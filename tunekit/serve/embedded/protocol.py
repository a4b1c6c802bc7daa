"""OpenAI-compatible request bodies, response/chunk builders and the error envelope.

Fields the embedded engine cannot honour are refused with a 400 naming the field (never dropped
silently); a few client-side bookkeeping fields (``user``, ``metadata``, ...) are accepted and unused.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Accepted and without effect on generation.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                            "safety_identifier"})
# Below this (but above 0) logits / temperature overflow or leave one token with all the mass; 0 is greedy.
# vLLM clamps to the same floor; refusing it says so instead of sampling something else than was asked.
MIN_TEMPERATURE = 0.01
# torch.Generator seeds are 64-bit: anything wider cannot seed a row (seed + i is used for choice i).
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1

# Known OpenAI fields the engine does not implement: refused unless left at their neutral value.
_UNSUPPORTED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "verbosity": (None,),
}


class APIErrorResponse(Exception):
    """Raised inside handlers; rendered as OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                             500: "server_error"}.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, t: float | None) -> float | None:
        if t is not None and 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; got {t}")
        return t

    def check_fields(self) -> None:
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED_FIELDS:
                continue
            if key in _UNSUPPORTED_NEUTRAL:
                if value in _UNSUPPORTED_NEUTRAL[key]:
                    continue
                raise APIErrorResponse(400, f"'{key}' is not supported by tunekit's embedded server; remove it "
                                            "(or serve with engine='vllm')", param=key, code="unsupported_parameter")
            raise APIErrorResponse(400, f"unknown field '{key}'", param=key, code="unknown_parameter")
        stops = self.stop_list()
        if len(stops) > 16 or any(not s for s in stops):
            raise APIErrorResponse(400, "stop must be up to 16 non-empty strings", param="stop")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if not p:
            raise APIErrorResponse(400, "prompt must not be empty", param="prompt")
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIErrorResponse(400, f"content part type {part.get('type')!r} is not supported "
                                            "(text only)", param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str | None = None
    lora_int_id: int | None = None


# -- response builders --------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None, *,
                    chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                            "choices": choices}
    if not chunk or use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None, *,
              chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
                            "created": int(time.time()), "model": model, "choices": choices}
    if not chunk or use is not None:
        body["usage"] = use
    return body


def model_card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "tunekit", "root": root,
            "parent": parent}
