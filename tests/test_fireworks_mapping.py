"""Fireworks field and status maps, checked against TrainingSpec and the fireworks-ai SDK types."""

from __future__ import annotations

import subprocess
import sys
import typing
import warnings

import pytest

import tunekit
from tunekit._exceptions import AuthenticationError, ConfigError, UnknownModelError, UnsupportedFieldError
from tunekit.backends.fireworks import mapping as m
from tunekit.schemas.job import JobStatus
from tunekit.schemas.spec import spec_leaf_fields

pytest.importorskip("fireworks")

from tests.conftest_fireworks import fw_env  # noqa: E402,F401


def plan(spec, rows=None, **kw):
    return tunekit.plan({"base_model": "qwen3-8b", **spec}, "fireworks", rows=rows, **kw)


def by_field(p):
    return {f.field: f for f in p.fields}


def test_every_spec_field_has_a_rule():
    assert set(m.FIELD_MAP) == set(spec_leaf_fields())


def test_status_map_is_total_over_the_sdk_and_docs():
    from fireworks.types import DpoJob, SupervisedFineTuningJob

    for model in (SupervisedFineTuningJob, DpoJob):
        literal = typing.get_args(typing.get_args(model.model_fields["state"].annotation)[0])
        assert set(literal) <= set(m.STATUS_MAP), set(literal) - set(m.STATUS_MAP)
    assert {"JOB_STATE_DELETED", "JOB_STATE_ARCHIVED"} <= set(m.STATUS_MAP)  # docs v5.10
    assert m.STATUS_MAP["JOB_STATE_COMPLETED"] is JobStatus.SUCCEEDED
    assert m.STATUS_MAP["JOB_STATE_EARLY_STOPPED"] is JobStatus.SUCCEEDED
    assert {m.STATUS_MAP[s] for s in ("JOB_STATE_FAILED", "JOB_STATE_EXPIRED")} == {JobStatus.FAILED}
    assert not m.STATUS_MAP["JOB_STATE_PAUSED"].terminal  # resumable
    assert all(m.STATUS_MAP[s].terminal for s in m.DELETED_STATES)


def test_plan_maps_transforms_and_shows_the_warmup_steps():
    p = plan({"hyperparameters": {"epochs": 3, "batch_size": 16, "warmup_ratio": 0.1, "learning_rate": 1e-4,
                                  "weight_decay": 0.01, "max_length": 4096},
              "adapter": {"r": 16}, "suffix": "Support Bot!"}, rows=1000)
    f = by_field(p)
    # 3 epochs x ceil(1000 / 16) = 189 steps; 10% -> ceil(18.9) = 19
    assert (f["hyperparameters.warmup_ratio"].disposition, f["hyperparameters.warmup_ratio"].sent) == ("transformed", 19)
    assert p.request == {
        "dataset": "accounts/{account}/datasets/{job}-train", "baseModel": "accounts/fireworks/models/qwen3-8b",
        "epochs": 3, "batchSizeSamples": 16, "learningRateWarmupSteps": 19, "learningRate": 1e-4,
        "optimizerWeightDecay": 0.01, "maxContextLength": 4096, "loraRank": 16,
        "outputModel": "accounts/{account}/models/support-bot-{job}"}
    assert f["hyperparameters.batch_size"].target == "batchSizeSamples"


def test_warmup_conversion_is_exact_at_float_edges():
    # 0.1 x 30 steps is 3.0000000000000004 in floating point: still 3 steps, not 4
    p = plan({"hyperparameters": {"batch_size": 1, "warmup_ratio": 0.1}}, rows=30)
    assert p.request["learningRateWarmupSteps"] == 3


def test_warmup_needs_batch_size_and_rows():
    f = by_field(plan({"hyperparameters": {"warmup_ratio": 0.1}}, rows=100, on_unsupported="ignore"))
    assert f["hyperparameters.warmup_ratio"].disposition == "unsupported"
    assert "batch_size" in f["hyperparameters.warmup_ratio"].reason
    with pytest.raises(ConfigError) as err:
        plan({"hyperparameters": {"batch_size": 8, "warmup_ratio": 0.1}})
    assert err.value.field == "hyperparameters.warmup_ratio" and "rows" in err.value.hint


@pytest.mark.parametrize("r", [1, 8, 64])
def test_power_of_two_ranks_are_sent(r):
    assert plan({"adapter": {"r": r}}).request["loraRank"] == r


@pytest.mark.parametrize("r,suggested", [(12, 16), (128, 64), (3, 4), (5, 4)])
def test_other_ranks_are_refused_with_the_reason(r, suggested):
    with pytest.raises(UnsupportedFieldError) as err:
        plan({"adapter": {"r": r}})
    assert "power of 2 up to 64" in str(err.value) and f"use e.g. {suggested}" in str(err.value)


def test_refusals_name_each_field_and_why():
    spec = {"adapter": {"alpha": 32, "dropout": 0.1, "target_modules": ["q_proj"], "use_dora": True,
                        "use_rslora": True, "init": "pissa", "loraplus_lr_ratio": 16},
            "hyperparameters": {"seed": 1, "max_grad_norm": 0.5, "gradient_accumulation_steps": 4,
                                "lr_scheduler": "cosine", "dpo_beta": 0.2},
            "quantization": "nf4"}
    with pytest.raises(UnsupportedFieldError) as err:
        plan(spec)
    refused = {d.field: d.reason for d in err.value.dispositions}
    assert set(refused) == {"adapter.alpha", "adapter.dropout", "adapter.target_modules", "adapter.use_dora",
                            "adapter.use_rslora", "adapter.init", "adapter.loraplus_lr_ratio", "hyperparameters.seed",
                            "hyperparameters.max_grad_norm", "hyperparameters.gradient_accumulation_steps",
                            "hyperparameters.lr_scheduler", "hyperparameters.dpo_beta", "quantization"}
    assert "method='dpo'" in refused["hyperparameters.dpo_beta"]
    assert "seed" in refused["hyperparameters.seed"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(spec, on_unsupported="warn")
    assert len(caught) == len(refused) and any("adapter.alpha" in str(w.message) for w in caught)
    assert "loraAlpha" not in str(p.request)


def test_values_fireworks_already_uses_are_honoured_without_sending():
    f = by_field(plan({"adapter": {"use_dora": False}, "method": "sft"}))
    assert f["adapter.use_dora"].disposition == "mapped" and f["adapter.use_dora"].sent is None
    assert "supervisedFineTuningJobs" in f["method"].reason


def test_dpo_nests_hyperparameters_and_always_sets_the_loss():
    p = plan({"method": "dpo", "hyperparameters": {"epochs": 2, "dpo_beta": 0.2, "batch_size": 4},
              "adapter": {"r": 32}, "suffix": "pref"})
    assert p.request == {
        "dataset": "accounts/{account}/datasets/{job}-train",
        "trainingConfig": {"baseModel": "accounts/fireworks/models/qwen3-8b", "epochs": 2, "batchSizeSamples": 4,
                           "loraRank": 32, "outputModel": "accounts/{account}/models/pref-{job}"},
        "lossConfig": {"method": "DPO", "dpo": {"beta": 0.2}}}
    assert plan({"method": "dpo"}).request["lossConfig"] == {"method": "DPO"}  # even when beta is not set


def test_dpo_limits():
    with pytest.raises(UnsupportedFieldError, match="beta < 0.5"):
        plan({"method": "dpo", "hyperparameters": {"dpo_beta": 0.7}})
    with pytest.raises(UnsupportedFieldError, match="no evaluation dataset"):
        plan({"method": "dpo", "validation_data": "v.jsonl"})


def test_validation_data_becomes_the_evaluation_dataset():
    p = plan({"validation_data": "v.jsonl"})
    assert p.request["evaluationDataset"] == "accounts/{account}/datasets/{job}-eval"


def test_example_limit():
    with pytest.raises(ConfigError, match="3,000,000"):
        plan({"hyperparameters": {"epochs": 4}}, rows=1_000_000)
    plan({"hyperparameters": {"epochs": 3}}, rows=1_000_000)


@pytest.mark.parametrize("name,expected", [
    ("llama-3.1-8b-instruct", "accounts/fireworks/models/llama-v3p1-8b-instruct"),
    ("qwen3-8b", "accounts/fireworks/models/qwen3-8b"),
    ("accounts/acme/models/my-base", "accounts/acme/models/my-base"),
    ("meta-llama/Llama-3.1-8B-Instruct", "accounts/fireworks/models/llama-v3p1-8b-instruct"),  # HF id, catalogued
])
def test_base_model_resolution(name, expected):
    assert tunekit.plan({"base_model": name}, "fireworks").request["baseModel"] == expected


def test_base_model_errors():
    with pytest.raises(UnknownModelError, match="openai"):
        tunekit.plan({"base_model": "gpt-4o-mini"}, "fireworks")
    with pytest.raises(ConfigError, match="not a Fireworks model name") as err:
        tunekit.plan({"base_model": "someone/unknown-model"}, "fireworks")
    assert err.value.field == "base_model"


def test_provider_options():
    p = plan({"provider_options": {"fireworks": {"displayName": "nightly", "wandbConfig": {"enabled": True}}}})
    assert p.request["displayName"] == "nightly" and p.request["wandbConfig"] == {"enabled": True}
    with pytest.raises(UnsupportedFieldError, match="valid: .*displayName"):
        plan({"provider_options": {"fireworks": {"loraAlpha": 16}}})
    with pytest.raises(UnsupportedFieldError, match="adapter.r"):
        plan({"provider_options": {"fireworks": {"loraRank": 128}}})  # would bypass the rank check
    p = plan({"method": "dpo", "provider_options": {"fireworks": {"trainingConfig.region": "US_IOWA_1"}}})
    assert p.request["trainingConfig"]["region"] == "US_IOWA_1"
    with pytest.raises(UnsupportedFieldError):  # an SFT-only option on a DPO job
        plan({"method": "dpo", "provider_options": {"fireworks": {"evalAutoCarveout": True}}})
    f = by_field(plan({"provider_options": {"together": {"n_evals": 2}}}, on_unsupported="ignore"))
    assert f["provider_options.together.n_evals"].disposition == "unsupported"


def test_option_keys_exist_in_the_sdk_params():
    from fireworks.types import dpo_job_create_params, supervised_fine_tuning_job_create_params
    from fireworks.types.shared_params import dpo_config, reinforcement_learning_loss_config, training_config

    from tunekit.backends.fireworks.backend import wire_name

    def wire(td):
        return {wire_name(n, h) for n, h in typing.get_type_hints(td, include_extras=True).items()}

    sft = wire(supervised_fine_tuning_job_create_params.SupervisedFineTuningJobCreateParams)
    assert m.SFT_OPTION_KEYS <= sft
    nested = {"trainingConfig": wire(training_config.TrainingConfig),
              "lossConfig": wire(reinforcement_learning_loss_config.ReinforcementLearningLossConfig),
              "lossConfig.dpo": wire(dpo_config.DpoConfig)}
    dpo_top = wire(dpo_job_create_params.DpoJobCreateParams)
    for key in m.DPO_OPTION_KEYS:
        parent, _, leaf = key.rpartition(".")
        assert leaf in (nested[parent] if parent else dpo_top), key
    # every SFT create field is either mapped by a spec field, an option, or deliberately left out
    left_out = {"account_id", "supervisedFineTuningJobId", "gradientAccumulationSteps"}
    assert sft - m.SFT_OPTION_KEYS - set(m.OWNED_KEYS) - left_out == set()


def test_job_and_resource_ids():
    assert m.job_id_for("tk-0123456789ab") == "tk-0123456789ab"
    assert m.job_id_for("9_Weird.ID") == "tk-9-weird-id"
    assert m.slug("Support Bot!") == "support-bot" and m.slug("42") == "m-42"


def test_sdk_kwargs_turns_wire_names_into_sdk_arguments():
    from fireworks.types import supervised_fine_tuning_job_create_params as p

    from tunekit.backends.fireworks.backend import sdk_kwargs

    kwargs, extra = sdk_kwargs({"dataset": "d", "loraRank": 8, "wandbConfig": {"apiKey": "k"}, "newField": 1},
                               p.SupervisedFineTuningJobCreateParams)
    assert kwargs == {"dataset": "d", "lora_rank": 8, "wandb_config": {"apiKey": "k"}}
    assert extra == {"newField": 1}


def test_credentials(monkeypatch):
    from tunekit.backends.fireworks.backend import FireworksBackend

    monkeypatch.setenv("FIREWORKS_API_KEY", "fw-secret-123")
    b = FireworksBackend()
    with pytest.raises(ConfigError) as err:
        b.client
    assert "FIREWORKS_ACCOUNT_ID" in err.value.hint
    client = FireworksBackend(account_id="acme").client
    assert client.account_id == "acme" and client.max_retries == 0  # tunekit's policy retries, not the SDK
    assert "fw-secret-123" not in repr(b) and "fw-secret-123" not in repr(vars(b))
    monkeypatch.delenv("FIREWORKS_API_KEY")
    with pytest.raises(AuthenticationError, match="no API key") as err:
        FireworksBackend(account_id="acme").client
    assert "FIREWORKS_API_KEY" in err.value.hint


def test_importing_the_backend_package_and_mapping_does_not_import_the_sdk():
    code = ("import sys, tunekit.backends.fireworks, tunekit.backends.fireworks.mapping; "
            "assert 'fireworks' not in sys.modules, 'SDK imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_rules():
    from tunekit.backends.fireworks.backend import FireworksBackend
    from tunekit.schemas.spec import TrainingSpec

    rules = FireworksBackend().data_rules(TrainingSpec(base_model="x"))
    assert rules.min_rows == 3 and "preference" not in {k.value for k in rules.kinds}
    assert {k.value for k in FireworksBackend().data_rules(TrainingSpec(base_model="x", method="dpo")).kinds} \
        == {"preference"}


@pytest.mark.parametrize("spec, bad", [({}, {"nodes": 0}), ({}, {"displayName": 5}), ({}, {"wandbConfig": "on"}),
                                       ({"method": "dpo"}, {"lossConfig.dpo.refCacheBatchSize": "8"})])
def test_option_values_are_checked_by_the_options_model(spec, bad):
    (key,) = bad
    with pytest.raises(ConfigError) as err:
        plan({**spec, "provider_options": {"fireworks": bad}})
    assert err.value.field == f"provider_options.fireworks.{key}" and "docs/backends/fireworks.md" in err.value.hint
    assert set(m.FireworksOptions.model_fields) == m.SFT_OPTION_KEYS | m.DPO_OPTION_KEYS
