"""The shared OpenAPI checker: 3.0 leftovers (nullable, boolean exclusive bounds), lookup, strict keys."""

from __future__ import annotations

import pytest

pytest.importorskip("jsonschema")

from tests.replay.spec_check import OpenAPISpec, load_provider_spec  # noqa: E402

TINY = {
    "openapi": "3.0.0",
    "servers": [{"url": "https://api.example.com/v1"}],
    "paths": {
        "/jobs/{id}": {"get": {"responses": {"200": {"content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Job"}}}}}}},
        "/jobs/estimate": {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["n"],
                "properties": {"n": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}}}}},
            "responses": {"200": {"description": "ok"}}}},
    },
    "components": {"schemas": {
        "Job": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"},
            "note": {"type": "string", "nullable": True},
            "kind": {"type": "string", "enum": ["a", "b"], "nullable": True},
            "file": {"allOf": [{"$ref": "#/components/schemas/File"}, {"nullable": True}]},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
        }},
        "File": {"type": "object", "properties": {"id": {"type": "string"}}},
    }},
}


def test_lookup_prefers_literal_segments_and_strips_base_path():
    spec = OpenAPISpec(TINY, uri="urn:test:tiny")
    assert spec.operation("POST", "/v1/jobs/estimate").template == "/jobs/estimate"
    assert spec.operation("GET", "/v1/jobs/abc?x=1").template == "/jobs/{id}"
    assert spec.operation("DELETE", "/v1/jobs/abc") is None
    assert spec.request_problems("DELETE", "/v1/jobs/abc") == ["DELETE /v1/jobs/abc: no such operation in the spec"]


def test_nullable_and_exclusive_bounds_are_understood():
    spec = OpenAPISpec(TINY, uri="urn:test:tiny2")
    ok = {"id": "j", "note": None, "kind": None, "file": None, "meta": {"anything": "x"}}
    assert spec.response_problems("GET", "/v1/jobs/j", 200, json=ok) == []
    assert spec.response_problems("GET", "/v1/jobs/j", 200, json={**ok, "kind": "c"})  # enum still enforced
    assert spec.response_problems("GET", "/v1/jobs/j", 200, json={**ok, "file": {"id": "f"}}) == []
    assert spec.request_problems("POST", "/v1/jobs/estimate", json={"n": 0})       # exclusive minimum 0
    assert spec.request_problems("POST", "/v1/jobs/estimate", json={"n": 0.1}) == []


def test_strict_reports_undeclared_keys_and_partial_ignores_required():
    spec = OpenAPISpec(TINY, uri="urn:test:tiny3")
    problems = spec.response_problems("GET", "/v1/jobs/j", 200, json={"id": "j", "made_up": 1})
    assert problems == ["GET /jobs/{id} -> 200 response['made_up']: key not in the spec schema"]
    assert spec.response_problems("GET", "/v1/jobs/j", 200, json={"id": "j", "made_up": 1}, strict=False) == []
    assert spec.request_problems("POST", "/v1/jobs/estimate", json={}, partial=True) == []
    assert spec.request_problems("POST", "/v1/jobs/estimate", json={})
    assert spec.response_problems("GET", "/v1/jobs/j", 404, json={}) == [
        "GET /jobs/{id} -> 404: status not documented (documented: ['200'])"]


def test_real_openai_spec():
    spec = load_provider_spec("openai")
    assert spec.request_problems("POST", "/v1/files", multipart=[
        {"name": "file", "filename": "t.jsonl", "size": 3}, {"name": "purpose", "filename": None, "value": "fine-tune"}]) == []
    assert spec.request_problems("POST", "/v1/files", multipart=[
        {"name": "file", "filename": "t.jsonl", "size": 3}, {"name": "purpose", "filename": None, "value": "nope"}])
    assert spec.request_problems("GET", "/v1/fine_tuning/jobs", query={"metadata[tunekit_job_id]": "x"}) == []
    bad_lr = {"model": "m", "training_file": "f", "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"learning_rate_multiplier": 0}}}}
    assert spec.request_problems("POST", "/v1/fine_tuning/jobs", json=bad_lr)


def test_real_together_spec_loads():
    spec = load_provider_spec("together")
    assert spec.base_path == "/v1"
    assert spec.operation("POST", "/v1/fine-tunes/estimate-price").template == "/fine-tunes/estimate-price"
    assert spec.operation("GET", "/v1/fine-tunes/ft-123").template == "/fine-tunes/{id}"
