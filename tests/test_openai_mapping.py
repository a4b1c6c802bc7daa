"""OpenAI plan: every spec field decided, refusals with reasons, transforms shown; statuses; the 2027-01-06
shutdown (injectable clock); data rules; lazy imports."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import typing
import warnings

import pytest

import tunekit
from tests.conftest_openai import CHAT, MODEL, NOW
from tunekit._exceptions import ConfigError, DataValidationError, UnsupportedFieldError
from tunekit.backends.openai import mapping as m
from tunekit.backends.openai.backend import OpenAIBackend, OpenAIShutdownWarning
from tunekit.schemas.job import JobStatus, map_status
from tunekit.schemas.spec import TrainingSpec, spec_leaf_fields

EVERY_FIELD = {
    "base_model": "gpt-4o-mini", "method": "sft", "quantization": "nf4", "validation_data": "v.jsonl",
    "suffix": "s",
    "hyperparameters": {"epochs": 3, "batch_size": 16, "learning_rate": 1e-4, "warmup_ratio": 0.1,
                        "lr_scheduler": "cosine", "weight_decay": 0.01, "max_grad_norm": 0.5,
                        "gradient_accumulation_steps": 2, "max_length": 1024, "seed": 3, "dpo_beta": 0.2},
    "adapter": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj"], "use_dora": True,
                "use_rslora": True, "init": "pissa", "loraplus_lr_ratio": 16},
}
REFUSED = {"quantization", "hyperparameters.learning_rate", "hyperparameters.warmup_ratio",
           "hyperparameters.lr_scheduler", "hyperparameters.weight_decay", "hyperparameters.max_grad_norm",
           "hyperparameters.gradient_accumulation_steps", "hyperparameters.max_length",
           "hyperparameters.dpo_beta",  # method is sft here
           *(f"adapter.{k}" for k in EVERY_FIELD["adapter"])}


def backend(now=NOW) -> OpenAIBackend:
    return OpenAIBackend(clock=lambda: now)


def test_field_map_covers_every_spec_leaf():
    assert set(m.FIELD_MAP) == set(spec_leaf_fields())


def test_every_set_field_is_decided_with_reasons():
    spec = TrainingSpec.model_validate(EVERY_FIELD)
    plan = backend().plan(spec, on_unsupported="ignore")
    decided = {d.field: d for d in plan.fields}
    assert set(decided) == set(spec.set_fields())
    assert {f for f, d in decided.items() if d.disposition == "unsupported"} == REFUSED
    assert all(d.reason for d in plan.unsupported)
    assert "no LoRA settings" in decided["adapter.r"].reason
    assert "learning_rate_multiplier" in decided["hyperparameters.learning_rate"].reason
    assert plan.request == {
        "model": MODEL, "training_file": m.TRAINING_FILE, "validation_file": m.VALIDATION_FILE, "suffix": "s",
        "seed": 3, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3,
                                                                                       "batch_size": 16}}}}
    assert decided["base_model"].disposition == "transformed" and decided["base_model"].sent == MODEL


def test_refusal_is_an_error_by_default_and_names_each_field():
    spec = TrainingSpec(base_model="gpt-4o-mini", hyperparameters={"learning_rate": 1e-4}, adapter={"r": 8})
    with pytest.raises(UnsupportedFieldError) as info:
        backend().plan(spec)
    assert {d.field for d in info.value.dispositions} == {"hyperparameters.learning_rate", "adapter.r"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = backend().plan(spec, on_unsupported="warn")
    assert sorted(str(w.message).split(":")[1].strip() for w in caught) == [
        "adapter.r not sent", "hyperparameters.learning_rate not sent"]
    assert "learning_rate_multiplier" not in str(plan.request)


def test_learning_rate_multiplier_option_goes_under_the_method():
    spec = TrainingSpec(base_model="gpt-4.1-mini", method="dpo", hyperparameters={"dpo_beta": 0.3},
                        provider_options={"openai": {"learning_rate_multiplier": 2}})
    plan = backend().plan(spec)
    assert plan.request["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.3, "learning_rate_multiplier": 2.0}}}
    assert plan.request["model"] == "gpt-4.1-mini-2025-04-14"
    for bad in (0, -1, "fast", True):
        with pytest.raises(ConfigError, match="learning_rate_multiplier"):
            backend().plan(TrainingSpec(base_model="gpt-4o-mini",
                                        provider_options={"openai": {"learning_rate_multiplier": bad}}))


def test_bounds_and_method_specific_fields():
    def dispo(**hp):
        spec = TrainingSpec(base_model="gpt-4o-mini", hyperparameters=hp)
        return backend().plan(spec, on_unsupported="ignore").fields[-1]

    assert dispo(epochs=51).disposition == "unsupported" and "1..50" in dispo(epochs=51).reason
    assert dispo(epochs=50).target == "method.supervised.hyperparameters.n_epochs"
    assert dispo(batch_size=257).disposition == "unsupported"
    assert dispo(dpo_beta=0.2).reason == "dpo_beta applies only to method='dpo'"


def test_provider_options_metadata_and_unknown_keys():
    spec = TrainingSpec(base_model="gpt-4o-mini", provider_options={"openai": {"metadata": {"team": "nlp"},
                                                                               "integrations": []}})
    b = backend()
    plan = b.plan(spec)
    from tunekit.store import default_store

    record = default_store().create_job("openai", {}, {}, job_id="tk-meta")
    kwargs = b.create_kwargs(record, plan, {"training_file": "file-1"})
    assert kwargs["metadata"] == {"team": "nlp", "tunekit_job_id": "tk-meta"}
    assert kwargs["training_file"] == "file-1" and "validation_file" not in kwargs
    with pytest.raises(ConfigError, match="tunekit sets it"):
        b.plan(TrainingSpec(base_model="m", provider_options={"openai": {"metadata": {"tunekit_job_id": "x"}}}))
    with pytest.raises(UnsupportedFieldError, match="valid: integrations, learning_rate_multiplier, metadata"):
        b.plan(TrainingSpec(base_model="m", provider_options={"openai": {"n_epochs": 2}}))
    with pytest.raises(UnsupportedFieldError, match="this job runs on 'openai'"):
        b.plan(TrainingSpec(base_model="m", provider_options={"together": {"x": 1}}))


@pytest.mark.parametrize("key, bad", [("integrations", "wandb"), ("integrations", [1]), ("metadata", {"k": 1}),
                                      ("metadata", {f"k{i}": "v" for i in range(16)})])
def test_provider_option_values_are_checked_by_the_options_model(key, bad):
    with pytest.raises(ConfigError) as err:
        backend().plan(TrainingSpec(base_model="gpt-4o-mini", provider_options={"openai": {key: bad}}))
    assert err.value.field == f"provider_options.openai.{key}" and "docs/backends/openai.md" in err.value.hint


def test_status_map_is_total_over_the_sdk_enum():
    from openai.types.fine_tuning import FineTuningJob

    documented = set(typing.get_args(FineTuningJob.model_fields["status"].annotation))
    assert documented <= set(m.STATUS_MAP)
    assert {map_status(m.STATUS_MAP, s) for s in ("succeeded", "failed", "cancelled")} == {
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert map_status(m.STATUS_MAP, "paused") is JobStatus.UNKNOWN  # not terminal: it can be resumed
    assert map_status(m.STATUS_MAP, "brand_new_status") is JobStatus.UNKNOWN


def test_catalog_names_resolve_and_non_openai_models_are_refused():
    assert backend().plan(TrainingSpec(base_model="gpt-4.1-nano")).request["model"] == "gpt-4.1-nano-2025-04-14"
    assert backend().plan(TrainingSpec(base_model="ft:gpt-4o-mini:org::abc")).request["model"] == \
        "ft:gpt-4o-mini:org::abc"  # native ids (incl. continuing from a fine-tuned model) pass through
    with pytest.raises(ConfigError, match="not offered by backend 'openai'"):
        backend().plan(TrainingSpec(base_model="llama-3.1-8b-instruct"))


# -- the 2027-01-06 shutdown ----------------------------------------------------------------------------

def test_warns_on_submit_before_the_shutdown():
    from tunekit.store import default_store

    b = backend(dt.datetime(2027, 1, 5, 23, 59, tzinfo=dt.timezone.utc))
    plan = b.plan(TrainingSpec(base_model="gpt-4o-mini"))  # planning does not warn, it notes
    assert any("2027-01-06" in n for n in plan.notes)
    record = default_store().create_job("openai", {}, {}, job_id="tk-warn")
    uploads = []

    def upload_files(job, spec):  # stands in for the upload: the order of events is what matters here
        uploads.append(job.id)
        raise RuntimeError("stop")

    b.upload_files = upload_files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="stop"):
            b.submit(record, TrainingSpec(base_model="gpt-4o-mini"), plan)
    (w,) = [w for w in caught if issubclass(w.category, OpenAIShutdownWarning)]
    text = str(w.message)
    assert "\n" not in text and "2027-01-06" in text and "(in 1 days)" in text
    assert "backend='together', 'fireworks' or 'local'" in text
    assert uploads == ["tk-warn"]  # the warning came first, then the upload went ahead


@pytest.mark.parametrize("now", [dt.datetime(2027, 1, 6, 0, 0, tzinfo=dt.timezone.utc), dt.date(2027, 3, 1),
                                 dt.datetime(2027, 1, 5, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))])
def test_refuses_from_the_shutdown_day(now, tmp_path):
    """From 2027-01-06 (UTC) on: plan and submit refuse before any upload; nothing reaches the network."""
    b = backend(now)
    spec = TrainingSpec(base_model="gpt-4o-mini")
    with pytest.raises(ConfigError, match="stopped accepting new fine-tuning jobs on 2027-01-06") as info:
        b.plan(spec)
    assert info.value.field == "backend" and "'local'" in info.value.hint
    with pytest.raises(ConfigError, match="nothing was uploaded"):
        b.submit(None, spec, None)  # refused before touching the job, the data or a client
    assert "client" not in vars(b)


def test_refusal_through_finetune_leaves_no_job(tmp_path):
    late = dt.datetime(2027, 2, 1, tzinfo=dt.timezone.utc)
    with pytest.raises(ConfigError, match="2027-01-06"):
        tunekit.finetune(CHAT, backend="openai", base_model="gpt-4o-mini", api_key="sk-x",
                         backend_options={"clock": lambda: late})
    assert tunekit.list_jobs() == []


def test_today_is_before_the_shutdown_with_the_real_clock():
    # The refusal is date-driven; this documents which side of it the suite runs on.
    if dt.datetime.now(dt.timezone.utc).date() >= m.SHUTDOWN_DATE:
        pytest.skip("running after OpenAI's fine-tuning shutdown: submits are refused by design")
    assert OpenAIBackend()._today() < m.SHUTDOWN_DATE


# -- data rules, credentials, imports ---------------------------------------------------------------------

def test_data_rules_minimum_ten_rows(tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(CHAT.read_text().splitlines(keepends=True)[:9]))
    report = tunekit.validate(few, backend="openai")
    assert not report.valid
    with pytest.raises(DataValidationError):
        tunekit.finetune(few, backend="openai", base_model="gpt-4o-mini", api_key="sk-x",
                         backend_options={"clock": lambda: NOW})
    rules = OpenAIBackend().data_rules(TrainingSpec(base_model="m", method="dpo"))
    assert rules.min_rows == 10 and rules.kinds == {"preference"}


def test_key_not_in_repr_and_missing_key_is_clear(monkeypatch):
    b = OpenAIBackend(api_key="sk-secret-123")
    assert "sk-secret" not in repr(b) and "sk-secret" not in repr(vars(b))
    from tunekit._exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="no API key for openai") as info:
        OpenAIBackend().api_key
    assert "OPENAI_API_KEY" in info.value.hint
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    client = OpenAIBackend().client
    assert client.max_retries == 0 and str(client.base_url) == "http://127.0.0.1:9/v1/"


def test_importing_the_backend_does_not_import_the_sdk():
    code = ("import sys, datetime, tunekit, tunekit.backends.openai, tunekit.backends.openai.backend, "
            "tunekit.backends.openai.mapping\n"
            "tunekit.plan({'base_model': 'gpt-4o-mini'}, 'openai', clock=lambda: datetime.date(2026, 11, 28))\n"
            "assert 'openai' not in sys.modules, 'openai SDK imported'\n"
            "assert 'httpx2' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
