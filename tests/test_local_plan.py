"""The local backend's plan: a decision for every spec field, the resolved config, quantization 'auto'."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tunekit
from tunekit._exceptions import ConfigError, UnsupportedFieldError
from tunekit.backends.base import PlanContext
from tunekit.backends.local.backend import LocalBackend
from tunekit.backends.local.peft_config import DeviceInfo
from tunekit.schemas.spec import TrainingSpec, spec_leaf_fields

# Llama-3.1-8B's shape (a config.json alone: the plan never reads weights)
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "tie_word_embeddings": False}

EVERY_FIELD = {
    "method": "sft",
    "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-4, "warmup_ratio": 0.1,
                        "lr_scheduler": "cosine", "weight_decay": 0.01, "max_grad_norm": 0.5,
                        "gradient_accumulation_steps": 2, "max_length": 512, "seed": 7, "dpo_beta": 0.2},
    "adapter": {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "use_dora": True,
                "use_rslora": True, "init": "gaussian", "loraplus_lr_ratio": 16.0},
    "quantization": "none",
    "validation_data": "val.jsonl",
    "suffix": "my-run",
    "provider_options": {"local": {"checkpoint_steps": 5, "max_steps": 20, "eval_steps": 5, "device": "cpu",
                                   "gradient_checkpointing": True, "memory_budget_gb": 8, "logging_steps": 2,
                                   "output_dir": "out", "keep_checkpoints": 5}},
}


@pytest.fixture
def model_8b(tmp_path):
    d = tmp_path / "llama-8b-shape"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return d


def _spec(base, **fields):
    return TrainingSpec.model_validate({"base_model": str(base), **fields})


def _get(request, dotted):
    for key in dotted.split("."):
        request = request[key]
    return request


def test_every_leaf_field_has_a_rule():
    missing = [f for f in spec_leaf_fields() if f not in LocalBackend.field_map]
    assert missing == []


def test_every_set_field_is_mapped_where_it_says(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tiny_model, **EVERY_FIELD)
    plan = LocalBackend().plan(spec, on_unsupported="ignore", context=PlanContext(spec=spec, rows=40))
    by_field = {d.field: d for d in plan.fields}
    expected = set(spec.set_fields())
    assert set(by_field) == expected
    # dpo_beta on an SFT spec is the one refusal, with its reason
    assert by_field["hyperparameters.dpo_beta"].disposition == "unsupported"
    assert "method='dpo'" in by_field["hyperparameters.dpo_beta"].reason
    for name, d in by_field.items():
        if name == "hyperparameters.dpo_beta":
            continue
        assert d.disposition in ("mapped", "transformed"), name
        assert _get(plan.request, d.target) == d.sent, name  # the request holds what the plan says was sent
    r = plan.request
    assert r["lora"]["r"] == 16 and r["lora"]["lora_alpha"] == 32 and r["lora"]["use_dora"] is True
    assert r["lora"]["init_lora_weights"] == "gaussian" and r["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert r["training"]["micro_batch_size"] == 4 and r["training"]["gradient_accumulation_steps"] == 2
    assert r["training"]["optimizer"] == "loraplus+adamw_torch"
    assert r["options"]["output_dir"] == str(tmp_path / "out")  # resolved to an absolute path
    assert r["options"]["checkpoint_steps"] == 5 and r["options"]["max_steps"] == 20
    assert r["options"]["keep_checkpoints"] == 5
    assert r["output"]["name"] == "my-run"
    assert r["device"]["type"] == "cpu"
    with pytest.raises(UnsupportedFieldError, match="dpo_beta"):
        LocalBackend().plan(spec)


def test_dpo_beta_is_mapped_for_dpo(tiny_model):
    spec = _spec(tiny_model, method="dpo", hyperparameters={"dpo_beta": 0.3})
    plan = LocalBackend().plan(spec)
    assert {d.field: d.disposition for d in plan.fields}["hyperparameters.dpo_beta"] == "mapped"
    assert plan.request["training"]["dpo_beta"] == 0.3


def test_defaults_are_resolved_without_any_set_field(tiny_model):
    plan = LocalBackend().plan(_spec(tiny_model), context=PlanContext(spec=_spec(tiny_model), rows=100))
    r = plan.request
    assert [d.field for d in plan.fields] == ["base_model"]
    assert r["training"]["micro_batch_size"] == 8
    # packing is off unless asked: 100 rows / batch 8 = 13 steps
    assert r["training"]["estimated_total_steps"] == 13 and r["training"]["packing"]["enabled"] is False
    # packing 'auto' is decided from the tokenized rows: rows per step, hence steps, are not known yet
    auto = _spec(tiny_model, provider_options={"local": {"packing": "auto"}})
    plan_auto = LocalBackend().plan(auto, context=PlanContext(spec=auto, rows=100))
    assert plan_auto.request["training"]["estimated_total_steps"] is None
    assert plan_auto.request["training"]["packing"]["enabled"] is None
    assert r["options"]["checkpoint_steps"] == 2  # ~10 checkpoints per run by default
    assert r["options"]["keep_checkpoints"] == 3  # of which the newest 3 stay on disk
    assert r["lora"]["r"] == 32 and r["lora"]["init_lora_weights"] is True
    assert any(n.startswith("memory: ~") and "fits" in n for n in plan.notes)


def test_canonical_model_name_is_resolved():
    plan = tunekit.plan({"base_model": "llama-3.1-8b-instruct"}, "local")
    d = plan.fields[0]
    assert d.disposition == "transformed" and d.sent == "meta-llama/Llama-3.1-8B-Instruct"
    assert plan.request["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert any("no estimate" in n for n in plan.notes)  # not downloaded: the plan says so, never guesses
    with pytest.raises(ConfigError, match="not offered by backend 'local'"):
        tunekit.plan({"base_model": "gpt-4o-mini"}, "local")


def test_quantization_auto_on_cpu_is_none_with_reason(tiny_model):
    r = LocalBackend().plan(_spec(tiny_model, quantization="auto")).request
    assert r["quantization"]["mode"] == "none" and "CPU" in r["quantization"]["reason"]
    assert r["training"]["optimizer"] == "adamw_torch"


def test_quantization_nf4_picks_adamw_with_fp32_state(tiny_model):
    r = LocalBackend().plan(_spec(tiny_model, quantization="nf4")).request
    assert r["quantization"] == {"requested": "nf4", "mode": "nf4", "reason": r["quantization"]["reason"]}
    assert "QLoRA" in r["quantization"]["reason"]
    # not bitsandbytes' 8-bit AdamW of the QLoRA recipe: it steps each parameter from Python (resolve.optimizer_name)
    assert r["training"]["optimizer"] == "adamw_torch" and r["training"]["dtype"] == "nf4+bf16"


def test_quantization_auto_on_gpu_follows_the_memory_estimate(model_8b, monkeypatch):
    # A GPU of a given size, faked at the one place the device is read: the decision logic is real.
    import tunekit.backends.local.resolve as resolve_mod
    from tunekit.backends.local.memory import HEADROOM

    def on_gpu(gib):
        monkeypatch.setattr(resolve_mod, "device_info", lambda device=None: DeviceInfo("cuda", int(gib * 1024**3), "x"))
        return LocalBackend().plan(_spec(model_8b, hyperparameters={"batch_size": 4, "max_length": 2048})).request

    big = on_gpu(141)  # an H200: the bf16 model fits with room
    assert big["quantization"]["mode"] == "none" and "fits" in big["quantization"]["reason"]
    assert big["memory_estimate"]["fits"] is True and big["training"]["optimizer"] == "adamw_torch_fused"
    # auto checkpointing: the worker gets no explicit request, so train() applies the per-layer policy shown here
    assert big["options"]["gradient_checkpointing"] is None
    assert big["training"]["checkpointing"]["requested"] == "auto" and big["training"]["checkpointing"]["enabled"]
    assert big["training"]["checkpointing"]["layers"].endswith("/32")
    # a GPU just too small for the bf16 estimate: auto falls back to NF4, which fits
    bf16_bytes = big["memory_estimate"]["total_bytes"]
    small = on_gpu(bf16_bytes / HEADROOM * 0.97 / 1024**3)
    assert small["quantization"]["mode"] == "nf4" and "would not fit" in small["quantization"]["reason"]
    assert small["memory_estimate"]["fits"] is True and small["training"]["optimizer"] == "adamw_torch_fused"
    assert small["memory_estimate"]["total_bytes"] < bf16_bytes


def test_plan_refuses_pissa_on_a_4bit_base(tiny_model):
    with pytest.raises(ConfigError, match="full-precision") as err:
        LocalBackend().plan(_spec(tiny_model, quantization="nf4", adapter={"init": "pissa"}))
    assert err.value.field == "adapter.init"


def test_batch_size_must_divide_by_accumulation(tiny_model):
    with pytest.raises(ConfigError) as err:
        LocalBackend().plan(_spec(tiny_model, hyperparameters={"batch_size": 6, "gradient_accumulation_steps": 4}))
    assert err.value.field == "hyperparameters.gradient_accumulation_steps"


def test_option_typo_and_other_backends_options_are_refused(tiny_model):
    with pytest.raises(UnsupportedFieldError) as err:
        LocalBackend().plan(_spec(tiny_model, provider_options={"local": {"checkpoint_step": 5}}))
    assert "checkpoint_steps" in str(err.value)  # the valid keys are listed
    plan = LocalBackend().plan(_spec(tiny_model, provider_options={"together": {"x": 1}}), on_unsupported="ignore")
    assert plan.fields[-1].disposition == "unsupported" and "together" in plan.fields[-1].reason


@pytest.mark.parametrize("key, value", [("checkpoint_steps", 0), ("max_steps", "ten"), ("device", "tpu"),
                                        ("eval_steps", 1.5), ("gradient_checkpointing", "yes"),
                                        ("memory_budget_gb", -1), ("memory_budget_gb", 1e300),
                                        ("max_steps", 10**12), ("eval_steps", 10**12), ("keep_checkpoints", 0)])
def test_bad_option_values_name_the_option(tiny_model, key, value):
    with pytest.raises(ConfigError) as err:
        LocalBackend().plan(_spec(tiny_model, provider_options={"local": {key: value}}))
    assert err.value.field == f"provider_options.local.{key}"
    assert str(err.value).startswith(f"provider_options.local.{key}={value!r} refused: it should ")
    assert "docs/local.md" in err.value.hint  # the CLI's one line ends with the next step


def test_local_options_are_one_model_with_their_defaults(tmp_path):
    from tunekit.backends.local.options import LocalOptions

    spec = TrainingSpec(base_model="m", provider_options={"local": {"max_steps": 7, "output_dir": str(tmp_path / "o"),
                                                                    "memory_budget_gb": 2}})
    opts = LocalBackend.provider_options(spec)
    assert isinstance(opts, LocalOptions) and opts.max_steps == 7 and opts.keep_checkpoints == 3
    assert opts.logging_steps == 1 and opts.checkpoint_steps is None and opts.memory_budget_bytes == 2 * 1024**3
    with pytest.raises(ConfigError, match="less than 1") as err:  # the constraint says why
        LocalBackend.provider_options(TrainingSpec(base_model="m", provider_options={"local": {"eval_steps": 1.5}}))
    assert err.value.field == "provider_options.local.eval_steps" and "fraction of the run" in err.value.hint


def test_any_backend_declares_its_options_as_a_model():
    from pydantic import BaseModel, ConfigDict, Field

    from tunekit.backends.base import Backend

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        region: str = Field("us", pattern="^(us|eu)$", description="'us' or 'eu'")

    class Toy(Backend):
        name = "toy"
        options_model = Opts
        submit = refresh = cancel = None

    plan = Toy().plan(TrainingSpec(base_model="m", provider_options={"toy": {"region": "eu", "zone": 1}}),
                      on_unsupported="ignore")
    by_field = {f.field: f for f in plan.fields}
    assert plan.request == {"region": "eu"} and by_field["provider_options.toy.region"].disposition == "transformed"
    assert by_field["provider_options.toy.zone"].reason == "unknown option for toy; valid: region"
    with pytest.raises(ConfigError, match="should match pattern") as err:
        Toy().plan(TrainingSpec(base_model="m", provider_options={"toy": {"region": "mars"}}))
    assert err.value.field == "provider_options.toy.region" and "'us' or 'eu'" in err.value.hint
    assert Toy.provider_options(TrainingSpec(base_model="m")) == Opts()


def test_importing_the_backend_does_not_import_torch():
    code = ("import sys, tunekit.backends.local.backend, tunekit.plot, tunekit.adapters.provenance, "
            "tunekit.adapters.resolve, tunekit.adapters.merge; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
