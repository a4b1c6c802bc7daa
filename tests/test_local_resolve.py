"""The plan shows what the worker runs: the plan's request is the run, checked end to end on a tiny model (CPU).

For each spec the backend plans it, the run gets its data as submit gives it, then the worker (worker._train)
loads that stored run and trains it; the run train() wrote is the stored one, and every resolved value the
plan states equals what train() records.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

from tunekit.backends.base import PlanContext  # noqa: E402
from tunekit.backends.local.backend import LocalBackend  # noqa: E402
from tunekit.backends.local.resolve import resolve_run  # noqa: E402
from tunekit.backends.local.run import DataFile, LocalRun, RunData  # noqa: E402
from tunekit.backends.local.train import TrainCallbacks  # noqa: E402
from tunekit.backends.local.worker import _train  # noqa: E402
from tunekit.schemas.spec import TrainingSpec  # noqa: E402

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"Q{i % 4}:", "response": f" A{i % 4}{i % 4}"} for i in range(8)]


@pytest.mark.parametrize("variant, extra, optimizer, optimizer_class", [
    # QLoRA too: AdamW with fp32 state (resolve.optimizer_name); LoRA+ passes torch's AdamW itself
    ("nf4 on CPU", {"quantization": "nf4"}, "adamw_torch", "torch.optim.adamw.AdamW"),
    ("no quantization", {"quantization": "none"}, "adamw_torch", "torch.optim.adamw.AdamW"),
    ("LoRA+", {"adapter": {"r": 8, "loraplus_lr_ratio": 16}}, "loraplus+adamw_torch", "torch.optim.adamw.AdamW"),
    ("LoRA+ on nf4", {"quantization": "nf4", "adapter": {"r": 8, "loraplus_lr_ratio": 16}},
     "loraplus+adamw_torch", "torch.optim.adamw.AdamW"),
])
def test_plan_equals_what_the_worker_trains(tiny_model, tmp_path, monkeypatch, variant, extra, optimizer,
                                           optimizer_class):
    if extra.get("quantization") == "nf4":
        pytest.importorskip("bitsandbytes")
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = TrainingSpec.model_validate({
        "base_model": str(tiny_model), "adapter": {"r": 8}, **extra,
        "hyperparameters": {"batch_size": 4, "gradient_accumulation_steps": 2, "max_length": 64, "learning_rate": 5e-3},
        "provider_options": {"local": {"max_steps": 2, "output_dir": str(tmp_path / "out"), "memory_budget_gb": 4}},
    })
    plan = LocalBackend().plan(spec, context=PlanContext(spec=spec, rows=len(ROWS)))
    req = plan.request
    assert req["training"]["optimizer"] == optimizer, variant

    sha256 = hashlib.sha256(data.read_bytes()).hexdigest()
    snapshot = DataFile(source=str(data), path=str(tmp_path / "job" / "train.jsonl"), sha256=sha256, rows=len(ROWS))
    stored = LocalRun.model_validate(req).model_copy(update={"data": RunData(train=snapshot)})
    record = SimpleNamespace(id="tk-resolve", request=stored.model_dump(mode="json"), spec=spec.model_dump())
    import tunekit.backends.local.resolve as resolve_mod
    import tunekit.backends.local.peft_config as peft_config_mod
    import tunekit.backends.local.speed as speed_mod

    def resolved_again(*a, **kw):
        raise AssertionError("the worker resolved the run again")

    monkeypatch.setattr(resolve_mod, "resolve_run", resolved_again)  # the plan was the one pass
    monkeypatch.setattr(speed_mod, "plan", resolved_again)
    monkeypatch.setattr(peft_config_mod, "resolve_quantization", resolved_again)  # train() loads the run's mode
    out = _train(record, TrainCallbacks(), None)
    trained = LocalRun.model_validate_json((tmp_path / "out" / "run.json").read_text())
    assert trained == stored == LocalRun.model_validate(record.request)  # the worker trained the stored run

    assert out.quantization == {"mode": req["quantization"]["mode"], "reason": req["quantization"]["reason"]}
    assert out.optimizer == f"{optimizer} ({optimizer_class})"
    assert (out.micro_batch, out.grad_accum) == (2, 2)
    assert (out.micro_batch, out.grad_accum) == (req["training"]["micro_batch_size"],
                                                 req["training"]["gradient_accumulation_steps"])
    assert out.dtype == req["training"]["dtype"] == ("nf4+bf16" if extra.get("quantization") == "nf4" else "fp32")
    assert out.device == req["device"]["type"] == "cpu"
    assert req["options"]["gradient_checkpointing"] is None  # auto: train() resolves it as the plan did
    assert out.gradient_checkpointing is req["training"]["checkpointing"]["enabled"] is False
    planned = req["memory_estimate"]
    assert planned["budget_bytes"] == out.memory_estimate["device_bytes"] == 4 * 1024**3
    assert {k: out.memory_estimate[k] for k in ("total_bytes", "breakdown", "fits")} == {
        k: planned[k] for k in ("total_bytes", "breakdown", "fits")}
    assert out.metrics["steps"] == 2 and math.isfinite(out.metrics["train_loss"])
    if spec.adapter.loraplus_lr_ratio:  # LoRA+ really built the optimizer: two learning rates
        assert sorted(out.extra["optimizer_lrs"]) == [pytest.approx(5e-3), pytest.approx(5e-3 * 16)]


def test_resolve_run_is_pure_and_matches_the_plan(tiny_model):
    """No torch at import; the plan's request is resolve_run's values (GPU 'auto' is in test_local_plan)."""
    import subprocess

    code = ("import sys, tunekit.backends.local.resolve, tunekit.backends.local.run; print('torch' in sys.modules, "
            "'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]
    spec = TrainingSpec.model_validate({"base_model": str(tiny_model), "quantization": "nf4",
                                        "hyperparameters": {"batch_size": 8, "gradient_accumulation_steps": 4}})
    run = resolve_run(spec, device="cpu")
    req = LocalBackend().plan(spec).request
    assert (run.micro_batch, run.grad_accum, run.optimizer, run.dtype, run.quant.mode) == (
        req["training"]["micro_batch_size"], req["training"]["gradient_accumulation_steps"],
        req["training"]["optimizer"], req["training"]["dtype"], req["quantization"]["mode"]) == (
        2, 4, "adamw_torch", "nf4+bf16", "nf4")
    assert run.estimate.total_bytes == req["memory_estimate"]["total_bytes"]
    assert run.speed is not None and run.speed.checkpointed_layers == 0  # CPU default: no checkpointing


def test_another_device_than_planned_is_a_plan_change(tiny_model):
    """The worker checks the facts the plan assumed; on another machine it re-plans and says what moved."""
    from tunekit.backends.local.run import check_facts

    spec = TrainingSpec.model_validate({"base_model": str(tiny_model),
                                        "provider_options": {"local": {"device": "cpu"}}})
    planned = LocalRun.model_validate(LocalBackend().plan(spec).request)
    same, changes = check_facts(planned, spec)
    assert same is planned and changes == {}  # this machine: nothing re-resolved
    elsewhere = planned.model_copy(update={"device": planned.device.model_copy(update={"memory_bytes": 2**40})})
    now, changes = check_facts(elsewhere, spec)
    assert changes["facts"]["device"][0]["memory_bytes"] == 2**40
    assert changes["device.memory_bytes"] == [2**40, planned.device.memory_bytes]
    assert now == planned  # resolving again on the planning machine gives the plan back


def test_a_hub_model_not_cached_at_plan_time_is_fetched_and_replanned_by_the_worker(tiny_model, tmp_path,
                                                                                      monkeypatch):
    """The plan never downloads: a hub model not yet in the cache is planned without its config. The worker
    fetches config.json into the cache and re-plans with it (else train() could only refuse the run)."""
    import huggingface_hub
    from huggingface_hub import constants

    from tunekit.backends.local.run import check_facts

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo, fetched = "tunekit-test/tiny-llama", []

    def hf_hub_download(repo_id, filename, **kw):  # the hub's cache layout, as a real download leaves it
        fetched.append((repo_id, filename))
        snap = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        (snap.parent.parent / "refs").mkdir()
        (snap.parent.parent / "refs" / "main").write_text("abc123")
        (snap / filename).write_text((tiny_model / filename).read_text())
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    spec = TrainingSpec.model_validate({"base_model": repo, "provider_options": {"local": {"device": "cpu"}}})
    planned = LocalRun.model_validate(LocalBackend().plan(spec).request)
    assert planned.memory_estimate is None and planned.speed is None and fetched == []  # the plan read no network
    now, changes = check_facts(planned, spec)
    assert fetched == [(repo, "config.json")]
    assert changes["facts"] == {"config": ["unreadable", "read"]}
    assert now.memory_estimate is not None and now.memory_estimate.total_bytes > 0 and now.speed is not None


def test_a_plan_resolves_the_base_model_and_the_run_once(tiny_model, monkeypatch):
    import tunekit.backends.local.backend as backend_mod
    import tunekit.backends.local.resolve as resolve_mod

    calls = []
    base, run = backend_mod.resolve_base_model, resolve_mod.resolve_run
    monkeypatch.setattr(backend_mod, "resolve_base_model", lambda v: calls.append("base_model") or base(v))
    monkeypatch.setattr(resolve_mod, "resolve_run", lambda *a, **kw: calls.append("run") or run(*a, **kw))
    spec = TrainingSpec.model_validate({"base_model": str(tiny_model), "quantization": "none", "suffix": "s"})
    plan = LocalBackend().plan(spec)
    assert calls == ["base_model", "run"]  # the field map shows the run's base model, it does not resolve it again
    assert plan.request["base_model"] == str(tiny_model.resolve())
    assert next(f for f in plan.fields if f.field == "base_model").disposition == "transformed"
