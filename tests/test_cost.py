"""Cost before launch: the price-table estimate per managed backend, local GPU-hours, Together's own estimate,
and --max-cost refusing before anything is uploaded or recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import tunekit
from tunekit import ConfigError
from tunekit.api import estimate_cost
from tunekit.cli.main import main
from tunekit.schemas.job import JobStatus
from tunekit.store import Store
from tests.conftest_together import EXAMPLE_DATA, pinned_job_id, recording, sent, together_env  # noqa: F401
from tests.replay.fixtures import replay_server  # noqa: F401

TRAIN = EXAMPLE_DATA / "train.jsonl"


def file_tokens(epochs: int) -> float:
    """What validation counted (characters, no tokenizer given) as tokens at 4 characters each, x epochs."""
    ln = tunekit.validate(TRAIN).length
    assert ln.unit == "characters"
    return ln.mean * ln.count / 4 * epochs


# USD per 1M trained tokens as the catalog's table states them (its date and source are checked below)
@pytest.mark.parametrize("backend,model,per_million", [
    ("together", "llama-3.1-8b-instruct", 0.48),
    ("together", "llama-3.1-70b-instruct", 2.90),
    ("fireworks", "llama-3.1-70b-instruct", 3.00),
    ("openai", "gpt-4o-mini", 3.00),
    ("openai", "gpt-4.1-nano", 1.50),
])
def test_price_table_times_trained_tokens(backend, model, per_million):
    est = estimate_cost(TRAIN, {"hyperparameters": {"epochs": 3}}, backend=backend, base_model=model)
    assert est.tokens == round(file_tokens(3))
    assert est.usd == pytest.approx(est.tokens / 1e6 * per_million, rel=1e-3)
    assert "as of 2025-06" in est.basis and "pricing" in est.basis
    assert "characters / 4" in est.notes[0]
    assert est.line().startswith("estimated cost: $")


def test_unknown_price_is_said_not_guessed():
    est = estimate_cost(TRAIN, backend="together", base_model="acme/private-model")
    assert est.usd is None and "no price known" in est.basis
    with pytest.raises(ConfigError, match="no cost estimate") as err:
        tunekit.cost.check_limit(est, 5.0)
    assert err.value.field == "max_cost"


def test_local_gpu_hours_from_the_h200_throughput(tiny_model):
    from tunekit.backends.local.memory import count_params

    est = estimate_cost(TRAIN, {"hyperparameters": {"epochs": 2}}, backend="local", base_model=str(tiny_model))
    params = count_params(__import__("json").loads((tiny_model / "config.json").read_text()))["total"]
    rate = 14751 * 8.03e9 / params  # bf16 LoRA on the H200 (docs/benchmarks.md, 72a9a4c), scaled by size
    assert est.usd is None and est.gpu_hours == pytest.approx(round(file_tokens(2)) / rate / 3600)
    assert "H200" in est.basis and "estimate" in est.line()
    assert "LoRA" in est.basis and "none" not in est.basis  # the recipe by name, not the quantization mode
    assert "under 0.001 GPU-hours" in est.line() and "e-" not in est.line()  # seconds on a tiny model, not 1e-09
    assert any("speed differs" in n for n in est.notes)  # this run's device is not an H200
    tunekit.cost.check_limit(est, 0.0)  # a local run is GPU time, not a bill

    # the memory plan chose 4-bit and DoRA: that measured rate; a hub id is sized from its name
    plan = SimpleNamespace(request={"quantization": {"mode": "nf4"}, "lora": {"use_dora": True},
                                    "base_model": "meta-llama/Llama-3.1-70B-Instruct",
                                    "device": {"type": "cuda", "name": "NVIDIA H200"}})
    spec = tunekit.api.load_spec({"base_model": "x"})
    report = tunekit.validate(TRAIN)
    big = tunekit.cost.estimate("local", spec, plan, report)
    assert big.gpu_hours == pytest.approx(big.tokens / (9105 * 8.03e9 / 70e9) / 3600)
    assert not any("speed differs" in n for n in big.notes)


def test_max_cost_refuses_before_upload_and_records_nothing(capsys):
    code = main(["finetune", str(TRAIN), "--backend", "together", "--base-model", "llama-3.1-8b-instruct",
                 "--max-cost", "0.0001"])
    err = capsys.readouterr().err
    assert code == 2
    assert "estimated cost: $0.0002" in err  # shown first: 1 epoch of the file at $0.48 / 1M tokens
    assert "error: the estimate $0.000" in err and "is above --max-cost $0.0001" in err and "Traceback" not in err
    assert Store().list_jobs(limit=None) == []  # no job row; no API key is set, so no request could be made


def test_plan_shows_the_estimate(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"base_model": "llama-3.1-8b-instruct", "hyperparameters": {"epochs": 2}}')
    assert main(["plan", str(spec), "--backend", "fireworks", "--data", str(TRAIN)]) == 0
    out = capsys.readouterr().out
    assert f"for {round(file_tokens(2)):,} trained tokens ($0.5 per 1M trained tokens, https://fireworks.ai" in out


def test_together_estimate_is_recorded_next_to_the_table(together_env, pinned_job_id):  # noqa: F811
    srv = together_env("lifecycle")
    job = tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together", max_cost=10.0,
                           hyperparameters={"epochs": 1})
    assert job.remote_id and len(sent(srv, "POST", "/v1/fine-tunes/estimate-price")) == 1  # the SDK's one call
    costs = [e for _, e in job.events() if e.type == "cost_estimate"]
    assert [e.message for e in costs][1] == "together's estimate: $4.20"
    assert costs[0].data["usd"] == pytest.approx(round(file_tokens(1)) / 1e6 * 0.48, rel=1e-3)
    assert costs[1].data["provider"]["estimated_train_token_count"] == 36000


def test_together_estimate_above_max_cost_stops_before_the_create(together_env, pinned_job_id):  # noqa: F811
    from tests.test_together_replay import _spec_clean

    rec = recording("lifecycle")
    upto = next(i for i, x in enumerate(rec["exchanges"]) if x["request"]["path"].endswith("/estimate-price"))
    rec["exchanges"] = rec["exchanges"][:upto + 1]  # the create is never reached
    srv = together_env(rec)
    with pytest.raises(ConfigError, match=r"Together's estimate \$4.20 is above --max-cost \$1.00") as err:
        tunekit.finetune(TRAIN, base_model="llama-3.1-8b-instruct", backend="together", max_cost=1.0)
    assert err.value.field == "max_cost"
    srv.assert_done()
    assert sent(srv, "POST", "/v1/fine-tunes") == []
    (record,) = Store().list_jobs(limit=None)
    assert record.status is JobStatus.FAILED and "max-cost" in record.error and record.remote_id is None
    _spec_clean(srv)
