"""Every OpenAI recording, and the requests tunekit plans, against the OpenAPI spec vendored in tests/specs/openai/.

The replay tests also check every request the SDK really sent (tests/conftest_openai.spec_problems)."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest_openai import NOW, RECORDINGS
from tests.replay.spec_check import check_recording, load_provider_spec
from tunekit.backends.openai import mapping as m
from tunekit.backends.openai.backend import OpenAIBackend
from tunekit.schemas.spec import TrainingSpec

RECORDING_FILES = sorted(RECORDINGS.glob("*.json"))


@pytest.fixture(scope="module")
def spec():
    return load_provider_spec("openai")


def test_there_are_recordings():
    names = {p.stem for p in RECORDING_FILES}
    assert {"lifecycle", "dpo_create", "cancel", "failed", "error_400_create", "error_401_upload",
            "error_404_retrieve", "rate_limit_429", "server_error_500", "dropped_create", "large_upload"} <= names


@pytest.mark.parametrize("path", RECORDING_FILES, ids=[p.stem for p in RECORDING_FILES])
def test_recording_matches_the_spec(spec, path):
    assert check_recording(spec, path, error_schema="ErrorResponse") == []


def test_the_check_is_not_vacuous(spec):
    rec = json.loads((RECORDINGS / "lifecycle.json").read_text())
    bad = copy.deepcopy(rec)
    bad["exchanges"][2]["response"]["json"]["status"] = "done"          # not in the status enum
    bad["exchanges"][4]["response"]["json"]["fine_tuned_model_id"] = "x"  # made-up key
    bad["exchanges"][1]["request"]["json"]["method"]["type"] = "lora"     # not a method type
    problems = check_recording(spec, bad, error_schema="ErrorResponse")
    assert any("'done'" in p for p in problems)
    assert any("fine_tuned_model_id" in p for p in problems)
    assert any("'lora'" in p for p in problems)


@pytest.mark.parametrize("fields", [
    {"base_model": "gpt-4o-mini", "suffix": "s", "validation_data": "v.jsonl",
     "hyperparameters": {"epochs": 50, "batch_size": 256, "seed": 2**31 - 1},
     "provider_options": {"openai": {"learning_rate_multiplier": 0.1, "metadata": {"k": "v"},
                                     "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}}},
    {"base_model": "gpt-4.1-mini", "method": "dpo", "hyperparameters": {"epochs": 1, "batch_size": 1,
                                                                       "dpo_beta": 2.0}},
])
def test_planned_request_is_a_valid_create_body(spec, fields):
    from tunekit.store import default_store

    b = OpenAIBackend(clock=lambda: NOW)
    plan = b.plan(TrainingSpec.model_validate(fields))
    record = default_store().create_job("openai", {}, {}, job_id="tk-spec")
    files = {"training_file": "file-1", **({"validation_file": "file-2"} if "validation_data" in fields else {})}
    body = json.loads(json.dumps(b.create_kwargs(record, plan, files)))
    assert spec.request_problems("POST", "/v1/fine_tuning/jobs", json=body) == []


def test_status_map_covers_the_spec_enum(spec):
    enum = spec.doc["components"]["schemas"]["FineTuningJob"]["properties"]["status"]["enum"]
    assert set(enum) <= set(m.STATUS_MAP)
