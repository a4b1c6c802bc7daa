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
