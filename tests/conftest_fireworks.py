"""Fireworks test helpers: pinned job id, credentials, and the SDK-based spec checker.

Fireworks publishes no OpenAPI file, so requests are checked against the fireworks-ai SDK's request
TypedDicts (every key exists, types and enum values fit) and responses against its pydantic models
(every key exists, enum values valid). Imported by tests/test_fireworks_*.py.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest

from tests.replay.fixtures import RECORDINGS, replay_server  # noqa: F401  (fixture re-export)

REC = RECORDINGS / "fireworks"
JOB_ID = "tk-0123456789ab"
ACCOUNT = "acme"
KEY = "fw-test-key-not-real"
FAST = {"dataset_poll_interval": 0.01}


@pytest.fixture
def fw_env(monkeypatch):
    """Credentials in the environment and the tunekit job id pinned (recordings use its derived ids)."""
    pytest.importorskip("fireworks")
    import tunekit.store.db as db

    monkeypatch.setenv("FIREWORKS_API_KEY", KEY)
    monkeypatch.setenv("FIREWORKS_ACCOUNT_ID", ACCOUNT)
    monkeypatch.setattr(db, "new_job_id", lambda: JOB_ID)
    monkeypatch.setenv("TUNEKIT_MAX_RETRIES", "4")


# -- the SDK as the spec ------------------------------------------------------------------------------------

def _routes() -> list[tuple[str, re.Pattern[str], Any, Any, frozenset[str]]]:
    """(method, path regex, request params TypedDict or None, response model or None, query-only keys)."""
    from fireworks.types import (
        Dataset,
        DatasetUploadResponse,
        DpoJob,
        SupervisedFineTuningJob,
        dataset_create_params,
        dataset_get_upload_endpoint_params,
        dataset_get_upload_endpoint_response,
        dpo_job_create_params,
        supervised_fine_tuning_job_create_params,
    )
    from fireworks.pagination import SyncCursorDpoJobs, SyncCursorSupervisedFineTuningJobs
    from fireworks.types.chat import CompletionCreateResponse, completion_create_params

    a = r"/v1/accounts/[^/]+"
    seg = r"[^/:]+"
    sft, dpo = SupervisedFineTuningJob, DpoJob
    return [
        ("POST", re.compile(f"{a}/datasets"), dataset_create_params.DatasetCreateParams, Dataset, frozenset()),
        ("POST", re.compile(f"{a}/datasets/{seg}:upload"), None, DatasetUploadResponse, frozenset()),
        ("POST", re.compile(f"{a}/datasets/{seg}:getUploadEndpoint"),
         dataset_get_upload_endpoint_params.DatasetGetUploadEndpointParams,
         dataset_get_upload_endpoint_response.DatasetGetUploadEndpointResponse, frozenset({"readMask"})),
        ("POST", re.compile(f"{a}/datasets/{seg}:validateUpload"), "empty", "empty", frozenset()),
        ("GET", re.compile(f"{a}/datasets/{seg}"), None, Dataset, frozenset()),
        ("POST", re.compile(f"{a}/supervisedFineTuningJobs"),
         supervised_fine_tuning_job_create_params.SupervisedFineTuningJobCreateParams, sft,
         frozenset({"supervisedFineTuningJobId"})),
        ("GET", re.compile(f"{a}/supervisedFineTuningJobs"), None, SyncCursorSupervisedFineTuningJobs[sft],
         frozenset()),
        ("GET", re.compile(f"{a}/supervisedFineTuningJobs/{seg}"), None, sft, frozenset()),
        ("POST", re.compile(f"{a}/supervisedFineTuningJobs/{seg}:cancel"), "empty", "empty", frozenset()),
        ("POST", re.compile(f"{a}/supervisedFineTuningJobs/{seg}:resume"), "empty", sft, frozenset()),
        ("POST", re.compile(f"{a}/dpoJobs"), dpo_job_create_params.DpoJobCreateParams, dpo, frozenset({"dpoJobId"})),
        ("GET", re.compile(f"{a}/dpoJobs"), None, SyncCursorDpoJobs[dpo], frozenset()),
        ("GET", re.compile(f"{a}/dpoJobs/{seg}"), None, dpo, frozenset()),
        ("POST", re.compile(f"{a}/dpoJobs/{seg}:cancel"), "empty", "empty", frozenset()),
        ("POST", re.compile(f"{a}/dpoJobs/{seg}:resume"), "empty", dpo, frozenset()),
        ("POST", re.compile("/v1/chat/completions"), completion_create_params.CompletionCreateParamsNonStreaming,
         CompletionCreateResponse, frozenset()),  # inference (tunekit eval), under FIREWORKS_BASE_URL
    ]


def route(method: str, path: str):
    for m, pattern, params, model, query_keys in _routes():
        if m == method and pattern.fullmatch(path):
            return params, model, query_keys
    raise AssertionError(f"no SDK operation for {method} {path}")


def _alias_map(typed_dict: Any) -> dict[str, Any]:
    from tunekit.backends.fireworks.backend import wire_name

    return {wire_name(name, hint): hint for name, hint in typing.get_type_hints(typed_dict, include_extras=True).items()}


def _strip(hint: Any) -> Any:
    """Required[...], NotRequired[...], Annotated[...] -> the bare type."""
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            hint = typing.get_args(hint)[0]
        elif origin is not None and getattr(origin, "_name", None) in ("Required", "NotRequired"):
            hint = typing.get_args(hint)[0]
        elif str(origin).endswith(("Required", "NotRequired")):
            hint = typing.get_args(hint)[0]
        else:
            return hint


def _is_typeddict(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, dict) and hasattr(t, "__annotations__") and hasattr(t, "__total__")


def check_value(value: Any, hint: Any, where: str, problems: list[str]) -> None:
    hint = _strip(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is object or hint is Any:
        return
    if origin is typing.Union:
        trials = []
        for option in args:
            sub: list[str] = []
            check_value(value, option, where, sub)
            if not sub:
                return
            trials += sub
        problems.append(f"{where}: {value!r} fits none of {hint}")
        return
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{where}: {value!r} not one of {args}")
        return
    if _is_typeddict(hint):
        check_body(value, hint, where, problems)
        return
    if origin in (dict, typing.Dict) or hint is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object")
        elif args:
            for k, v in value.items():
                check_value(v, args[1], f"{where}.{k}", problems)
        return
    if origin in (list, typing.List, typing.Iterable) or str(origin).endswith("Iterable"):
        if not isinstance(value, list):
            problems.append(f"{where}: expected an array")
        else:
            for i, v in enumerate(value):
                check_value(v, args[0] if args else Any, f"{where}[{i}]", problems)
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        return
    if not ok:
        problems.append(f"{where}: {value!r} is not {getattr(hint, '__name__', hint)}")


def check_body(body: Any, typed_dict: Any, where: str = "body", problems: list[str] | None = None,
               skip: frozenset[str] = frozenset()) -> list[str]:
    """Every key of ``body`` is a field (by wire alias) of ``typed_dict`` and its value fits the type."""
    problems = [] if problems is None else problems
    if not isinstance(body, dict):
        problems.append(f"{where}: expected an object, got {type(body).__name__}")
        return problems
    fields = _alias_map(typed_dict)
    for key, value in body.items():
        if key in skip or key not in fields:
            problems.append(f"{where}.{key}: not a field of {typed_dict.__name__}")
            continue
        check_value(value, fields[key], f"{where}.{key}", problems)
    return problems


def check_response(data: Any, model: Any, where: str = "response", problems: list[str] | None = None,
                   allow_states: frozenset[str] = frozenset()) -> list[str]:
    """Every key of ``data`` is a field (by alias) of the pydantic ``model``; enum values are valid."""
    from pydantic import BaseModel

    problems = [] if problems is None else problems
    if not isinstance(data, dict):
        problems.append(f"{where}: expected an object")
        return problems
    by_alias = {(info.alias or name): info for name, info in model.model_fields.items()}
    for key, value in data.items():
        info = by_alias.get(key)
        if info is None:
            problems.append(f"{where}.{key}: not a field of {model.__name__}")
            continue
        if key == "state" and value in allow_states:
            continue
        _check_model_value(value, info.annotation, f"{where}.{key}", problems, allow_states, BaseModel)
    return problems


def _check_model_value(value: Any, hint: Any, where: str, problems: list[str], allow: frozenset[str], base: Any):
    hint = _strip(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return
    if origin is typing.Union:
        for option in args:
            if option is type(None):
                continue
            sub: list[str] = []
            _check_model_value(value, option, where, sub, allow, base)
            if not sub:
                return
        problems.append(f"{where}: {value!r} fits none of {hint}")
        return
    if isinstance(hint, type) and issubclass(hint, base):
        check_response(value, hint, where, problems, allow)
        return
    if origin in (list, typing.List):
        if not isinstance(value, list):
            problems.append(f"{where}: expected an array")
            return
        for i, v in enumerate(value):
            _check_model_value(v, args[0], f"{where}[{i}]", problems, allow, base)
        return
    if origin is typing.Literal and value not in args:
        problems.append(f"{where}: {value!r} not one of {args}")
        return
    # Scalars: validate through pydantic (datetimes, ints as strings are rejected where the type is int).
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(hint).validate_python(value, strict=hint in (int, str, bool))
    except ValidationError as exc:
        problems.append(f"{where}: {value!r}: {exc.errors()[0]['msg']}")
    except Exception:  # noqa: BLE001 - a type TypeAdapter cannot build is not checked further
        pass


RPC_STATUS_KEYS = {"code", "message", "details"}


def check_error_body(body: Any, where: str = "error") -> list[str]:
    """google.rpc.Status: {code: int, message: str, details: [{"@type": ..., ...}]}."""
    if not isinstance(body, dict) or set(body) - RPC_STATUS_KEYS:
        return [f"{where}: not a google.rpc.Status body: {body!r}"]
    problems = []
    if not isinstance(body.get("code"), int) or not 0 <= body["code"] <= 16:
        problems.append(f"{where}.code: {body.get('code')!r} is not a gRPC code (0-16)")
    if not isinstance(body.get("message"), str):
        problems.append(f"{where}.message: not a string")
    for i, d in enumerate(body.get("details") or []):
        if not isinstance(d, dict) or "@type" not in d:
            problems.append(f"{where}.details[{i}]: no @type")
    return problems


def check_exchange(method: str, path: str, query: dict[str, Any] | None, body: Any, status: int | None,
                   response: Any, allow_states: frozenset[str] = frozenset()) -> list[str]:
    params, model, query_keys = route(method, path)
    problems: list[str] = []
    where = f"{method} {path}"
    for key in query or {}:
        if key not in query_keys and key not in ("pageSize", "pageToken", "filter", "orderBy", "readMask"):
            problems.append(f"{where}: unknown query parameter {key}")
    if body is not None:
        if params == "empty":
            if body != {}:
                problems.append(f"{where}: body must be {{}}")
        elif params is None:
            problems.append(f"{where}: this operation takes no JSON body")
        else:
            check_body(body, params, f"{where} body", problems, skip=query_keys | {"account_id"})
    if response is not None:
        if status is not None and status >= 400:
            problems += check_error_body(response, f"{where} error")
        elif model == "empty":
            if response != {}:
                problems.append(f"{where}: response must be {{}}")
        else:
            check_response(response, model, f"{where} response", problems, allow_states)
    return problems


def recording_paths() -> list[Path]:
    return sorted(REC.glob("*.json"))
