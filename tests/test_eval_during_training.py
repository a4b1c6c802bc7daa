"""Generative evaluation during local training (tunekit/eval/during_training.py): greedy answers to a few
held-out prompts every N steps, scored with tunekit eval's metrics, reported into the metric stream."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from tests.test_eval import HELD_OUT, train_on  # noqa: E402
from tunekit import ConfigError  # noqa: E402
from tunekit.eval.during_training import check_options, generative_eval_callback  # noqa: E402


@pytest.fixture(scope="module")
def held_out(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-eval")
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    return {"data": data, "good": train_on(tiny_model, data, root / "good")}


def _step(callback, model, step: int) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    state = TrainerState()
    state.global_step = step
    callback.on_step_end(TrainingArguments(output_dir="unused", report_to=[]), state, TrainerControl(), model=model)


def test_every_n_steps_the_trained_adapter_answers_and_is_scored(tiny_model, held_out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), held_out["good"],
                                      is_trainable=True)
    model.train()
    reports = []
    cb = generative_eval_callback({"steps": 2, "rows": 3, "max_tokens": 8,
                                   "metrics": ["exact_match", "contains", "json_valid"]},
                                  held_out["data"], tok, lambda step, values: reports.append((step, values)))
    _step(cb, model, 1)
    assert reports == []  # not a multiple of steps
    _step(cb, model, 2)
    assert cb.answers == [r["response"] for r in HELD_OUT[:3]]  # the first `rows` rows, greedy
    assert reports == [(2, {"exact_match": 1.0, "contains": 1.0, "json_valid": 1 / 3, "generated_rows": 3})]
    assert model.training  # back to training mode
    _step(cb, model, 4)
    assert reports[-1] == (4, reports[0][1])  # greedy: same weights, same figures


def test_the_untrained_base_scores_zero(tiny_model, held_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reports = []
    cb = generative_eval_callback({"steps": 1, "max_tokens": 8}, held_out["data"],
                                  AutoTokenizer.from_pretrained(tiny_model), lambda s, v: reports.append(v))
    _step(cb, AutoModelForCausalLM.from_pretrained(tiny_model), 1)
    assert reports == [{"exact_match": 0.0, "contains": 0.0, "generated_rows": 4}]  # default rows 8 > 4 rows


def test_options_defaults_cost_and_errors():
    opts = check_options({"steps": 50})
    assert opts.model_dump(mode="json") == {"steps": 50, "rows": 8, "max_tokens": 64,
                                            "metrics": ["exact_match", "contains"], "tokens_per_eval": 512}
    for bad, field in (({"rows": 8}, "steps"), ({"steps": 0}, "steps"), ({"steps": 5, "rows": True}, "rows"),
                       ({"steps": 5.0}, "steps"), ({"steps": 5, "metrics": ["loss"]}, "metrics"),
                       ({"steps": 5, "metrics": ["regex:("]}, "metrics"),
                       ({"steps": 5, "temperature": 1.0}, "temperature")):
        with pytest.raises(ConfigError) as info:
            check_options(bad)
        assert info.value.field == f"provider_options.local.eval_generate.{field}", (bad, str(info.value))
    with pytest.raises(ConfigError, match="not a text metric"):
        check_options({"steps": 5, "metrics": ["loss"]})


def test_chat_rows_are_prompted_as_training_tokenizes_them(tiny_model, tmp_path):
    """A chat row's prompt is its conversation up to the answer with the generation prompt: a prefix of the
    tokens the local backend trains on, the assistant answer following it."""
    from transformers import AutoTokenizer

    from tunekit.backends.local.datasets import prepare
    from tunekit.eval.during_training import _prompt_ids
    from tunekit.eval.run import load_rows

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    [row] = load_rows(data)[0]
    prompt = _prompt_ids(tok, row)
    [trained] = prepare(data, tok, method="sft", max_length=256).records
    ids, mask = trained["input_ids"], trained["assistant_masks"]
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    assert tok.decode([t for t, m in zip(ids, mask) if m]).startswith("4")


def test_a_local_run_reports_generated_metrics_every_n_steps(tiny_model, tmp_path):
    """provider_options.local.eval_generate through the plan and train(): metrics at steps 2 and 4 next to the
    validation loss, as on_eval reports them (the worker stores them in the job's "eval" split)."""
    from tests.test_local_train import make_spec, pr_rows, write_jsonl
    from tests.train_recorder import Recorder, train_files

    train_file = write_jsonl(tmp_path / "train.jsonl", pr_rows(16))
    val_file = write_jsonl(tmp_path / "val.jsonl", pr_rows(4))
    rec = Recorder()
    train_files(make_spec(tiny_model), train_file, tmp_path / "run", callbacks=rec, validation_path=val_file,
                max_steps=4, eval_steps=4, eval_generate={"steps": 2, "rows": 2, "max_tokens": 4,
                                                          "metrics": ["exact_match", "contains"]})
    generated = [(step, sorted(m)) for step, m in rec.evals if "generated_rows" in m]
    assert generated == [(2, ["contains", "exact_match", "generated_rows"]),
                         (4, ["contains", "exact_match", "generated_rows"])]
    assert [step for step, m in rec.evals if "eval_loss" in m] == [4]  # validation loss unchanged


def test_the_plan_shows_the_cost_and_refuses_the_option_without_validation_data(tiny_model, tmp_path):
    from tunekit.backends.local.backend import LocalBackend
    from tunekit.schemas.spec import TrainingSpec

    def spec(**kw):
        return TrainingSpec(base_model=str(tiny_model), **kw,
                            provider_options={"local": {"eval_generate": {"steps": 10, "rows": 4}}})

    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(HELD_OUT[0]) + "\n")
    plan = LocalBackend().plan(spec(validation_data=str(val)))
    assert plan.request["options"]["eval_generate"] == {"steps": 10, "rows": 4, "max_tokens": 64,
                                                        "metrics": ["exact_match", "contains"],
                                                        "tokens_per_eval": 256}
    with pytest.raises(ConfigError, match="no validation_data") as info:
        LocalBackend().plan(spec())
    assert info.value.field == "provider_options.local.eval_generate"
    # several ranks (here 2 CPU processes): refused at plan time, not generated N times or hung under FSDP2
    ranked = spec(validation_data=str(val))
    ranked = ranked.model_copy(update={"provider_options": {"local": {**ranked.provider_options["local"], "gpus": 2}}})
    with pytest.raises(ConfigError, match="runs in one process; this run trains on 2 ranks") as info:
        LocalBackend().plan(ranked)
    assert info.value.field == "provider_options.local.eval_generate"
    # FSDP2 at world size 1 (a GPU-only layout, so the plan's check is called directly): refused too
    from tunekit.eval.during_training import GenerateEvalOptions, check_plan

    with pytest.raises(ConfigError, match="shards the model with FSDP2") as info:
        check_plan(GenerateEvalOptions(steps=10), str(val), ranks=1, sharded=True)
    assert info.value.field == "provider_options.local.eval_generate"
    check_plan(GenerateEvalOptions(steps=10), str(val), ranks=1)  # one unsharded process: allowed


def test_generated_scores_and_validation_loss_at_the_same_step_share_its_row(tmp_path):
    """At a step where both run, neither the validation loss nor the generated answers' scores is lost."""
    from tunekit.store import Store

    store = Store(tmp_path / "state.db")
    job = store.create_job("local", {"base_model": "m"}, {})
    store.add_metrics(job.id, 60, {"contains": 1.0, "exact_match": 1.0, "generated_rows": 4}, split="eval")
    store.add_metrics(job.id, 60, {"eval_loss": 4.34, "loss": 4.34}, split="eval")
    store.add_metrics(job.id, 60, {"loss": 4.3}, split="eval")  # a resumed run reports the step again
    assert store.metrics(job.id, split="eval") == [{"split": "eval", "step": 60, "contains": 1.0, "exact_match": 1.0,
                                                    "generated_rows": 4, "eval_loss": 4.34, "loss": 4.3}]


def test_the_loss_plot_draws_the_generated_scores(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from tunekit.plot import plot_metrics, score_series

    rows = [{"split": "train", "step": 1, "loss": 5.0}, {"split": "train", "step": 2, "loss": 4.0},
            {"split": "eval", "step": 2, "loss": 4.5, "exact_match": 0.25, "contains": 0.5, "generated_rows": 4},
            {"split": "eval", "step": 4, "exact_match": 1.0, "contains": 1.0, "generated_rows": 4}]
    assert score_series(rows) == {"exact_match": [(2, 0.25), (4, 1.0)], "contains": [(2, 0.5), (4, 1.0)]}
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.extend(
        (line.get_label(), list(line.get_ydata())) for ax in fig.axes for line in ax.get_lines()) or real(fig, *a, **k))
    assert plot_metrics(rows, tmp_path / "loss.png").stat().st_size > 0
    assert ("exact_match (generated)", [0.25, 1.0]) in drawn and ("training loss", [5.0, 4.0]) in drawn
