"""The checked-in JSON Schemas match the code, and the example data matches the schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")

from tunekit.schemas import _jsonschema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
DATA = ROOT / "examples" / "data"
REGEN = "python -m tunekit.schemas._jsonschema"

EXPECTED_FILES = {"prompt_response.schema.json", "chat.schema.json", "preference.schema.json",
                  "training_spec.schema.json"}


def validator(name: str):
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_generator_covers_every_schema():
    assert set(_jsonschema.schemas()) == EXPECTED_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_checked_in_schema_is_current(name):
    path = SCHEMAS / name
    assert path.exists(), f"{path} is missing; run: {REGEN}"
    generated = _jsonschema.render(_jsonschema.schemas()[name])
    assert path.read_text(encoding="utf-8") == generated, f"{path} is out of date; run: {REGEN}"


@pytest.mark.parametrize("data,schema", [
    ("train.jsonl", "prompt_response.schema.json"), ("valid.jsonl", "prompt_response.schema.json"),
    ("chat.jsonl", "chat.schema.json"), ("preference.jsonl", "preference.schema.json"),
])
def test_example_rows_match_schema(data, schema):
    v = validator(schema)
    lines = (DATA / data).read_text(encoding="utf-8").splitlines()
    assert lines
    for n, line in enumerate(lines, 1):
        errors = [e.message for e in v.iter_errors(json.loads(line))]
        assert not errors, f"{data}:{n}: {errors}"


@pytest.mark.parametrize("schema,row", [
    ("prompt_response.schema.json", {"prompt": "a"}),
    ("prompt_response.schema.json", {"prompt": "a", "response": "b", "completion": "c"}),
    ("prompt_response.schema.json", {"prompt": "a", "response": None}),
    ("prompt_response.schema.json", {"prompt": "", "response": "b"}),
    ("prompt_response.schema.json", {"prompt": "a", "response": "b", "extra": 1}),
    ("chat.schema.json", {"messages": []}),
    ("chat.schema.json", {"messages": [{"role": "bot", "content": "x"}]}),
    ("chat.schema.json", {"messages": [{"role": "assistant", "content": "x", "weight": 2}]}),
    ("chat.schema.json", {"messages": [{"role": "assistant", "content": "x", "weight": True}]}),
    ("preference.schema.json", {"input": {"messages": [{"role": "user", "content": "q"}]},
                                "preferred_output": [], "non_preferred_output": []}),
])
def test_schema_rejects_bad_rows(schema, row):
    assert list(validator(schema).iter_errors(row))


def test_bad_example_rows_fail_the_schema():
    v = validator("prompt_response.schema.json")
    rows = [json.loads(line) for line in (DATA / "bad.jsonl").read_text().splitlines()[:3]]
    assert not list(v.iter_errors(rows[0])) and list(v.iter_errors(rows[1])) and list(v.iter_errors(rows[2]))


def test_training_spec_schema_accepts_a_spec():
    v = validator("training_spec.schema.json")
    assert not list(v.iter_errors({"base_model": "tiny", "hyperparameters": {"epochs": 2}}))
    assert list(v.iter_errors({"base_model": "tiny", "hyperparamters": {}}))


def test_check_mode_reports_stale_files(tmp_path, capsys):
    assert _jsonschema.main(["--dir", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED_FILES
    assert _jsonschema.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "chat.schema.json").write_text("{}\n")
    assert _jsonschema.main(["--check", "--dir", str(tmp_path)]) == 1
    assert REGEN in capsys.readouterr().err
