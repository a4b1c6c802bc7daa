"""Together mapping: every spec field decided, the transforms, statuses, the tag, and response translation."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

import tunekit
from tunekit.backends import get_backend
from tunekit.backends.together import mapping
from tunekit.backends.together.backend import TogetherBackend, failure_message, tagged_items, to_event
from tunekit.backends.together.upload import prepare_upload
from tunekit.schemas.job import JobStatus
from tunekit.schemas.spec import TrainingSpec, spec_leaf_fields

# A value different from the default for every leaf field, so each rule is exercised.
NON_DEFAULT = {
    "base_model": "llama-3.1-8b-instruct", "method": "dpo", "quantization": "nf4", "validation_data": "v.jsonl",
    "suffix": "s" * 30,
    "hyperparameters.epochs": 3, "hyperparameters.batch_size": 16, "hyperparameters.learning_rate": 1e-4,
    "hyperparameters.warmup_ratio": 0.1, "hyperparameters.lr_scheduler": "cosine",
    "hyperparameters.weight_decay": 0.01, "hyperparameters.max_grad_norm": 0.5,
    "hyperparameters.gradient_accumulation_steps": 4, "hyperparameters.max_length": 4096,
    "hyperparameters.seed": 7, "hyperparameters.dpo_beta": 0.3,
    "adapter.r": 8, "adapter.alpha": 16.5, "adapter.dropout": 0.1, "adapter.target_modules": ["q_proj"],
    "adapter.use_dora": True, "adapter.use_rslora": True, "adapter.init": "pissa", "adapter.loraplus_lr_ratio": 16,
}


def _spec(**flat) -> TrainingSpec:
    data: dict = {"base_model": flat.pop("base_model", "llama-3.1-8b-instruct")}
    for path, value in flat.items():
        head, _, leaf = path.partition(".")
        if leaf:
            data.setdefault(head, {})[leaf] = value
        else:
            data[head] = value
    return TrainingSpec.model_validate(data)


def _plan(**flat):
    return TogetherBackend().plan(_spec(**flat), on_unsupported="ignore")


def _field(plan, name):
    return next(f for f in plan.fields if f.field == name)


def test_every_leaf_field_has_a_rule_and_a_decision():
    assert set(mapping.FIELD_MAP) == set(spec_leaf_fields())
    assert set(NON_DEFAULT) == set(spec_leaf_fields())
    plan = _plan(**NON_DEFAULT)
    assert {f.field for f in plan.fields} == set(spec_leaf_fields())
    for f in plan.fields:
        assert "no mapping" not in (f.reason or ""), f.field
    refused = {f.field for f in plan.unsupported}
    assert refused == {"quantization", "suffix", "adapter.alpha", "adapter.use_dora", "adapter.use_rslora",
                       "adapter.init", "adapter.loraplus_lr_ratio"}
    assert plan.request["batch_size"] == 4  # 16 examples per step = 4 x 4 accumulation steps


def test_plan_request_is_the_sdk_create_kwargs():
    plan = tunekit.plan({"base_model": "llama-3.1-8b-instruct", "hyperparameters": {"epochs": 2, "seed": 3},
                         "adapter": {"r": 16, "alpha": 32, "dropout": 0.1}}, "together")
    assert plan.request == {"lora": True, "train_on_inputs": False, "model": mapping.resolve_model(
        "llama-3.1-8b-instruct", "together"), "n_epochs": 2, "random_seed": 3, "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.1}
    assert _field(plan, "base_model").disposition == "transformed"
    assert _field(plan, "adapter.r").disposition == "mapped"


def test_native_model_id_passes_through_and_other_backends_names_are_refused():
    plan = tunekit.plan({"base_model": "Qwen/Qwen3-8B"}, "together")
    assert plan.request["model"] == "Qwen/Qwen3-8B" and _field(plan, "base_model").disposition == "mapped"
    with pytest.raises(tunekit.ConfigError) as exc:
        tunekit.plan({"base_model": "gpt-4o-mini"}, "together")
    assert exc.value.field == "base_model"


def test_batch_size_is_split_by_gradient_accumulation():
    plan = _plan(**{"hyperparameters.batch_size": 32, "hyperparameters.gradient_accumulation_steps": 4})
    assert plan.request["batch_size"] == 8 and plan.request["gradient_accumulation_steps"] == 4
    assert _field(plan, "hyperparameters.batch_size").disposition == "transformed"
    assert _plan(**{"hyperparameters.batch_size": 32}).request["batch_size"] == 32
    odd = _plan(**{"hyperparameters.batch_size": 30, "hyperparameters.gradient_accumulation_steps": 4})
    assert "multiple" in _field(odd, "hyperparameters.batch_size").reason


def test_constant_scheduler_is_linear_to_ratio_one():
    plan = _plan(**{"hyperparameters.lr_scheduler": "constant"})
    assert plan.request["lr_scheduler_type"] == "linear" and plan.request["min_lr_ratio"] == 1.0
    cosine = _plan(**{"hyperparameters.lr_scheduler": "cosine"})
    assert cosine.request["lr_scheduler_type"] == "cosine" and "min_lr_ratio" not in cosine.request


def test_adapter_rules():
    plan = _plan(**{"adapter.alpha": 64.0, "adapter.target_modules": ["q_proj", "v_proj"],
                    "adapter.use_dora": False, "adapter.init": "default"})
    assert plan.request["lora_alpha"] == 64 and isinstance(plan.request["lora_alpha"], int)
    assert plan.request["lora_trainable_modules"] == "q_proj,v_proj"
    assert not plan.unsupported  # use_dora=False and init='default' are honoured, with nothing to send
    assert _field(plan, "adapter.use_dora").target is None and "use_dora" not in str(plan.request)
    assert _plan(**{"adapter.target_modules": "all-linear"}).request["lora_trainable_modules"] == "all-linear"
    with pytest.raises(tunekit.UnsupportedFieldError):
        TogetherBackend().plan(_spec(**{"adapter.use_dora": True}))


def test_method_dependent_fields():
    sft = _plan(**{"hyperparameters.dpo_beta": 0.2})
    assert sft.unsupported[0].field == "hyperparameters.dpo_beta"
    dpo = _plan(**{"method": "dpo", "hyperparameters.dpo_beta": 0.2})
    assert dpo.request["dpo_beta"] == 0.2 and dpo.request["training_method"] == "dpo"
    assert "train_on_inputs" not in dpo.request  # the SDK refuses it for DPO


def test_validation_data_turns_evals_on_unless_the_user_says():
    plan = _plan(validation_data="data/val.jsonl")
    assert plan.request["n_evals"] == mapping.DEFAULT_N_EVALS
    assert "val.jsonl" in plan.request["validation_file"]
    own = TogetherBackend().plan(_spec(validation_data="v.jsonl", provider_options={"together": {"n_evals": 3}}))
    assert own.request["n_evals"] == 3


def test_provider_options_are_checked_and_secrets_are_not_options():
    plan = TogetherBackend().plan(_spec(provider_options={"together": {"n_checkpoints": 4, "packing": False}}))
    assert plan.request["n_checkpoints"] == 4 and plan.request["packing"] is False
    bad = TogetherBackend().plan(_spec(provider_options={"together": {"wandb_api_key": "x"}}),
                                 on_unsupported="ignore")
    assert bad.unsupported[0].field == "provider_options.together.wandb_api_key"
    assert "wandb_api_key" not in bad.request


def test_suffix_tag_fits_together_limit():
    assert mapping.USER_SUFFIX_MAX == 24
    tagged = mapping.tagged_suffix("a" * 24, "tk-0123456789ab")
    assert tagged == "a" * 24 + "-tk-0123456789ab" and len(tagged) == mapping.SUFFIX_MAX
    assert mapping.tagged_suffix(None, "tk-0123456789ab") == "tk-0123456789ab"
    with pytest.raises(tunekit.ConfigError):
        mapping.tagged_suffix("a" * 25, "tk-0123456789ab")
    assert _field(_plan(suffix="a" * 25), "suffix").disposition == "unsupported"
    assert mapping.carries_tag({"suffix": "mine-TK-0123456789AB"}, "tk-0123456789ab")
    assert mapping.carries_tag({"model_output_name": "acme/m-tk-0123456789ab-77"}, "tk-0123456789ab")
    assert not mapping.carries_tag({"suffix": "tk-0123456789ab-other"}, "tk-0123456789ac")


def test_tagged_items_list_the_earliest_of_duplicates_first():
    listed = {"data": [
        {"id": "ft-b", "suffix": "x-tk-1", "created_at": "2026-11-28T10:05:00Z"},
        {"id": "ft-a", "suffix": "x-tk-1", "created_at": "2026-11-28T10:00:00Z"},
        {"id": "ft-c", "suffix": "x-tk-2", "created_at": "2026-11-28T09:00:00Z"}]}
    assert [item["id"] for item in tagged_items(listed, "tk-1")] == ["ft-a", "ft-b"]
    assert tagged_items(listed, "tk-3") == []


def test_status_map_is_total_over_the_sdk_enum():
    pytest.importorskip("together")
    from together.lib.types.fine_tuning import COMPLETED_STATUSES, FinetuneJobStatus

    assert {s.value for s in FinetuneJobStatus} == set(mapping.STATUS_MAP)
    terminal = {raw for raw, status in mapping.STATUS_MAP.items() if status.terminal}
    assert terminal == {s.value for s in COMPLETED_STATUSES}
    backend = TogetherBackend()
    assert backend.to_state({"id": "ft-1", "status": "brand_new_state"}).status is JobStatus.UNKNOWN
    assert backend.to_state({"id": "ft-1", "status": "cancel_requested"}).status is JobStatus.CANCELLING


def test_user_error_surfaces_the_event_message():
    state = TogetherBackend().to_state({"id": "ft-1", "status": "user_error", "events": [
        {"type": "job_start", "message": "started", "level": "info"},
        {"type": "JOB_USER_ERROR", "message": "Invalid file format: line 7 has no 'messages'", "level": "Error"}]})
    assert state.status is JobStatus.FAILED
    assert state.error == "user_error: Invalid file format: line 7 has no 'messages'"
    assert "without a message" in failure_message({"status": "error", "events": []})


def test_events_translate_levels_types_and_ids():
    legacy = to_event({"type": "WARNING", "level": "legacy_iwarning", "message": "slow", "created_at": "2026-11-28T10:00:00Z"})
    assert (legacy.type, legacy.level) == ("warning", "warning")
    assert legacy.created_at == pytest.approx(1795860000.0)
    again = to_event({"type": "WARNING", "level": "legacy_iwarning", "message": "slow", "created_at": "2026-11-28T10:00:00Z"})
    assert legacy.remote_id == again.remote_id  # no hash: a stable id from the content
    err = to_event({"type": "job_error", "level": None, "message": "boom", "created_at": None, "hash": "h1", "step": 3})
    assert (err.level, err.remote_id, err.data) == ("error", "h1", {"step": 3})


def test_data_rules():
    b = TogetherBackend()
    assert b.data_rules(_spec()).min_rows == 1
    assert {k.value for k in b.data_rules(_spec()).kinds} == {"prompt_response", "chat"}
    assert {k.value for k in b.data_rules(_spec(method="dpo")).kinds} == {"preference"}
    assert b.data_rules().max_bytes == int(50.1 * 2**30)


def test_prepare_upload_streams_prompt_response_to_completion(tmp_path):
    src = tmp_path / "pr.jsonl"
    src.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "completion": "d \\ud800"}\n')
    (tmp_path / "w").mkdir()
    out = prepare_upload(src, "prompt_response", tmp_path / "w")
    assert out.parent == tmp_path / "w" and src.read_text().count("response") == 1  # the source is untouched
    lines = out.read_text().splitlines()
    assert lines[0] == '{"prompt": "a", "completion": "b"}' and '"completion": "d \\ud800"' in lines[1]
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    assert prepare_upload(chat, "chat", tmp_path) == chat  # uploaded as is


def test_base_url_from_the_spec_loses_its_v1():
    assert TogetherBackend(base_url="https://api.together.xyz/v1/").base_url == "https://api.together.xyz"
    assert TogetherBackend(base_url="http://127.0.0.1:9").base_url == "http://127.0.0.1:9"


def test_model_limits_are_checked_with_field_names():
    limits = SimpleNamespace(
        lora_training=SimpleNamespace(max_rank=64, target_modules=["q_proj", "v_proj"], max_batch_size=64,
                                      max_batch_size_dpo=32, min_batch_size=8),
        max_num_epochs=20, min_learning_rate=1e-6, max_learning_rate=1e-2, max_seq_length_sft=8192,
        max_seq_length_dpo=4096, min_max_seq_length=512)
    ok = {"model": "m", "lora_r": 64, "lora_trainable_modules": "q_proj", "batch_size": 32, "n_epochs": 3,
          "learning_rate": 1e-4, "max_seq_length": 4096}
    mapping.check_limits(ok, limits, "dpo")
    cases = {"adapter.r": {"lora_r": 128}, "adapter.target_modules": {"lora_trainable_modules": "q_proj,w_up"},
             "hyperparameters.batch_size": {"batch_size": 48}, "hyperparameters.epochs": {"n_epochs": 21},
             "hyperparameters.learning_rate": {"learning_rate": 0.5},
             "hyperparameters.max_length": {"max_seq_length": 8192}}
    for field, change in cases.items():
        with pytest.raises(tunekit.ConfigError) as exc:
            mapping.check_limits({**ok, **change}, limits, "dpo")
        assert exc.value.field == field


def test_sdk_parameter_errors_become_config_errors():
    pytest.importorskip("together")
    from together import Together
    from together.types.finetune_model_limits import FinetuneModelLimits

    limits = FinetuneModelLimits.construct(
        lora_training=SimpleNamespace(default_rank=8, max_batch_size=64, max_batch_size_dpo=32, min_batch_size=8),
        full_training=None, supports_vision=False, min_max_seq_length=512, max_seq_length_sft=8192,
        max_seq_length_dpo=8192)
    client = Together(api_key="x", base_url="http://127.0.0.1:9", max_retries=0)  # never reached
    with pytest.raises(tunekit.ConfigError, match="train_on_inputs is only supported for SFT"):
        TogetherBackend._create(client, {"training_file": "f", "model": "m", "lora": True,
                                         "training_method": "dpo", "train_on_inputs": False,
                                         "model_limits": limits})


def test_wandb_key_comes_from_the_environment_at_submit(monkeypatch):
    pytest.importorskip("together")
    monkeypatch.setenv("TOGETHER_API_KEY", "k")
    backend = get_backend("together")
    monkeypatch.setattr(TogetherBackend, "_model_limits", staticmethod(lambda client, model: SimpleNamespace()))
    spec = _spec(provider_options={"together": {"wandb_project_name": "p"}})
    plan = backend.plan(spec)
    job = SimpleNamespace(id="tk-0123456789ab")
    with pytest.raises(tunekit.ConfigError, match="WANDB_API_KEY"):
        backend.create_kwargs(job, plan, {"training_file": "f"})
    monkeypatch.setenv("WANDB_API_KEY", "wb-secret")
    kwargs = backend.create_kwargs(job, plan, {"training_file": "f"})
    assert kwargs["wandb_api_key"] == "wb-secret" and kwargs["suffix"] == "tk-0123456789ab"
    assert "wb-secret" not in str(plan.request)


def test_import_and_plan_do_not_import_the_sdk():
    code = ("import sys, tunekit; from tunekit.backends import get_backend; "
            "p = tunekit.plan({'base_model': 'llama-3.1-8b-instruct'}, 'together'); "
            "get_backend('together').data_rules(); "
            "assert 'together' not in sys.modules, 'together imported'; "
            "assert 'torch' not in sys.modules; print(p.request['model'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Meta-Llama-3.1-8B" in out.stdout


def test_prepare_upload_memory_does_not_grow_with_the_file(tmp_path):
    import tracemalloc

    def peak_for(rows: int) -> tuple[int, int]:
        src = tmp_path / f"pr{rows}.jsonl"
        with open(src, "w") as f:
            for i in range(rows):
                f.write('{"prompt": "question %d %s", "response": "answer %d"}\n' % (i, "x" * 40, i))
        (tmp_path / str(rows)).mkdir()
        tracemalloc.start()
        out = prepare_upload(src, "prompt_response", tmp_path / str(rows))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, out.stat().st_size

    small_peak, _ = peak_for(2_000)
    big_peak, big_size = peak_for(30_000)      # ~2.5 MB
    assert big_size > 2_000_000
    assert big_peak < 1_000_000 and big_peak < small_peak * 3  # one row at a time, not the file


@pytest.mark.parametrize("key, bad", [("n_checkpoints", 0), ("n_checkpoints", "4"), ("packing", "yes"),
                                      ("train_on_inputs", "sometimes"), ("min_lr_ratio", 2.0), ("wandb_name", 7)])
def test_provider_option_values_are_checked_by_the_options_model(key, bad):
    from tunekit._exceptions import ConfigError

    with pytest.raises(ConfigError) as err:
        TogetherBackend().plan(_spec(provider_options={"together": {key: bad}}))
    assert err.value.field == f"provider_options.together.{key}" and "docs/backends/together.md" in err.value.hint
    assert TogetherBackend.options_model is mapping.TogetherOptions and "wandb_name" in mapping.WANDB_OPTIONS
