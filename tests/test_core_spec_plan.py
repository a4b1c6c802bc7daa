"""TrainingSpec strictness and the plan engine (dispositions for every set field, never a silent drop)."""

import warnings

import pytest

import tunekit
from tunekit.backends.base import Send
from tunekit.schemas.spec import TrainingSpec, spec_leaf_fields
from tests.fake_backend import FakeBackend, register

register()


def test_typo_in_spec_fails_with_field_and_suggestion():
    with pytest.raises(tunekit.ConfigError) as exc:
        tunekit.load_spec({"base_model": "m", "hyperparameters": {"learning_rte": 1e-4}})
    assert exc.value.field == "hyperparameters.learning_rte"
    assert "learning_rate" in str(exc.value)


def test_only_set_fields_count():
    spec = TrainingSpec(base_model="m", adapter={"r": 8})
    assert spec.set_fields() == {"adapter.r": 8, "base_model": "m"}


def test_plan_reports_every_set_field():
    spec = TrainingSpec(base_model="m", method="dpo", suffix="s",
                        hyperparameters={"epochs": 2, "learning_rate": 2e-4, "dpo_beta": 0.2},
                        adapter={"r": 8, "alpha": 16, "use_dora": True}, quantization="nf4",
                        provider_options={"fake": {"region": "eu"}, "openai": {"x": 1}})
    plan = FakeBackend().plan(spec, on_unsupported="ignore")
    by_field = {d.field: d for d in plan.fields}
    assert set(by_field) == set(spec.set_fields())
    assert by_field["hyperparameters.learning_rate"].disposition == "transformed"
    assert by_field["hyperparameters.learning_rate"].sent == 2.0
    assert plan.request["lr_multiplier"] == 2.0
    assert by_field["hyperparameters.epochs"].disposition == "mapped"
    assert by_field["adapter.use_dora"].disposition == "unsupported"
    assert by_field["hyperparameters.dpo_beta"].sent == 0.2
    assert by_field["provider_options.fake.region"].disposition == "mapped"
    assert plan.request["region"] == "eu"
    assert by_field["provider_options.openai.x"].disposition == "unsupported"
    assert "use_dora" not in plan.request


def test_unsupported_raises_by_default_and_warns_on_request():
    spec = TrainingSpec(base_model="m", adapter={"use_dora": True}, quantization="nf4")
    with pytest.raises(tunekit.UnsupportedFieldError) as exc:
        FakeBackend().plan(spec)
    assert {d.field for d in exc.value.dispositions} == {"adapter.use_dora", "quantization"}
    with pytest.warns(UserWarning, match="use_dora"):
        FakeBackend().plan(spec, on_unsupported="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FakeBackend().plan(spec, on_unsupported="ignore")


def test_conditional_rule_depends_on_spec():
    spec = TrainingSpec(base_model="m", hyperparameters={"dpo_beta": 0.3})
    plan = FakeBackend().plan(spec, on_unsupported="ignore")
    (d,) = [d for d in plan.fields if d.field == "hyperparameters.dpo_beta"]
    assert d.disposition == "unsupported" and "dpo" in d.reason


def test_field_without_rule_is_refused_not_dropped():
    class Partial(FakeBackend):
        field_map = {"base_model": Send("model")}

    plan = Partial().plan(TrainingSpec(base_model="m", adapter={"r": 4}), on_unsupported="ignore")
    (d,) = [d for d in plan.fields if d.field == "adapter.r"]
    assert d.disposition == "unsupported"


def test_fake_backend_decides_every_leaf_field():
    assert set(spec_leaf_fields()) <= set(FakeBackend.field_map)


def test_on_unsupported_value_checked():
    with pytest.raises(tunekit.ConfigError):
        FakeBackend().plan(TrainingSpec(base_model="m"), on_unsupported="drop")


# -- every number is finite and bounded ---------------------------------------------------------------

def _numeric_fields() -> list[str]:
    from tunekit.schemas.spec import TrainingSpec as S

    out = []
    for path in spec_leaf_fields():
        model, info = S, None
        for part in path.split("."):
            info = model.model_fields[part]
            model = info.annotation
        if any(t in str(info.annotation) for t in ("int", "float")) and "bool" not in str(info.annotation):
            out.append(path)
    return out


def _spec_with(path: str, value) -> dict:
    section, _, key = path.partition(".")
    return {"base_model": "m", section: {key: value}} if key else {"base_model": "m", section: value}


def test_every_numeric_field_has_a_lower_and_an_upper_bound():
    from tunekit.schemas.spec import field_range

    fields = _numeric_fields()
    assert "adapter.alpha" in fields and "hyperparameters.max_length" in fields and len(fields) >= 12
    for path in fields:
        text = field_range(path) or ""
        assert text.count("<") == 2, f"{path} is not bounded on both sides: {text!r}"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "Infinity", "nan"])
def test_non_finite_numbers_are_refused_in_every_field(value):
    for path in _numeric_fields():
        with pytest.raises(tunekit.ConfigError) as exc:
            tunekit.load_spec(_spec_with(path, value))
        assert exc.value.field == path
        assert "allowed:" in str(exc.value), str(exc.value)
        if isinstance(value, float):  # a string that is no integer gets pydantic's 'valid integer' message
            assert "finite number" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number_in_any_field(value):
    for path in _numeric_fields():  # pydantic's lax mode would read True as 1 (one epoch, rank 1)
        with pytest.raises(tunekit.ConfigError, match="is not a number") as exc:
            tunekit.load_spec(_spec_with(path, value))
        assert exc.value.field == path


@pytest.mark.parametrize("path, value, allowed", [
    ("adapter.alpha", 1e300, "0 < value <= 16384"),
    ("hyperparameters.weight_decay", 1e300, "0 <= value <= 10"),
    ("hyperparameters.max_length", 10**12, "16 <= value <= 1048576"),
    ("hyperparameters.max_grad_norm", 1e7, "0 < value <= 1000000"),
    ("hyperparameters.gradient_accumulation_steps", 4096, "1 <= value <= 1024"),
    ("adapter.loraplus_lr_ratio", 1e5, "0 < value <= 1024"),
])
def test_out_of_range_names_field_value_and_range(path, value, allowed):
    with pytest.raises(tunekit.ConfigError) as exc:
        tunekit.load_spec(_spec_with(path, value))
    msg = str(exc.value)
    assert exc.value.field == path and repr(value) in msg and f"(allowed: {allowed})" in msg


def test_non_finite_provider_option_is_refused():
    with pytest.raises(tunekit.ConfigError) as exc:
        tunekit.load_spec({"base_model": "m", "provider_options": {"together": {"x": {"y": [float("inf")]}}}})
    assert "provider_options.together.x" in str(exc.value) and "finite" in str(exc.value)
    assert tunekit.load_spec({"base_model": "m", "provider_options": {"together": {"x": 1e300}}})


@pytest.mark.parametrize("raw", ["Infinity", "1e309", "nan", "-Infinity", "NaN"])
def test_cli_set_non_finite_is_a_one_line_usage_error(capsys, raw):
    from pathlib import Path

    from tunekit.cli.main import main

    train = Path(__file__).resolve().parents[1] / "examples" / "data" / "train.jsonl"
    code = main(["finetune", str(train), "--backend", "fake", "--base-model", "m", "--set", f"adapter.alpha={raw}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("error: spec field 'adapter.alpha' = ") and "(allowed: 0 < value <= 16384)" in first
