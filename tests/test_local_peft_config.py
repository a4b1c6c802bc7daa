"""Spec -> PEFT/bitsandbytes config mapping, quantization decisions and refused combinations."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunekit._exceptions import ConfigError
from tunekit.backends.local.peft_config import (
    DeviceInfo,
    QuantDecision,
    check_combination,
    lora_kwargs,
    peft_error_to_config_error,
    resolve_quantization,
)
from tunekit.schemas.spec import TrainingSpec

CPU = DeviceInfo("cpu", 8 * 2**30)
GPU = DeviceInfo("cuda", 80 * 2**30, "fake")


def spec(**kw):
    return TrainingSpec(base_model="m", **kw)


def test_importing_config_modules_stays_light():
    code = (
        "import sys, tunekit.backends.local.peft_config, tunekit.backends.local.memory, "
        "tunekit.backends.local.train, tunekit.backends.local.datasets; "
        "print(sorted(m for m in ('torch','transformers','peft','trl','bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_defaults_map_to_all_linear_lora():
    kw = lora_kwargs(spec())
    assert kw["r"] == 32 and kw["lora_alpha"] == 64 and kw["target_modules"] == "all-linear"
    assert kw["init_lora_weights"] is True and kw["task_type"] == "CAUSAL_LM"
    assert kw["use_dora"] is False and kw["use_rslora"] is False and kw["lora_dropout"] == 0.05


@pytest.mark.parametrize(
    "init,expected",
    [("default", True), ("gaussian", "gaussian"), ("pissa", "pissa"), ("pissa_fast", "pissa_niter_16"),
     ("olora", "olora")],
)
def test_init_mapping_builds_a_peft_config(init, expected):
    from peft import LoraConfig

    s = spec(adapter={"init": init, "use_dora": True, "use_rslora": True, "r": 8, "alpha": 16,
                      "target_modules": ["q_proj", "v_proj"]})
    kw = lora_kwargs(s)
    assert kw["init_lora_weights"] == expected
    cfg = LoraConfig(**kw)
    assert cfg.init_lora_weights == expected and cfg.use_dora and cfg.use_rslora
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_quantization_decisions():
    assert resolve_quantization(spec(), CPU).mode == "none"  # auto on CPU
    assert resolve_quantization(spec(), GPU, bf16_fits=True).mode == "none"
    d = resolve_quantization(spec(), GPU, bf16_fits=False)
    assert d.mode == "nf4" and "not fit" in d.reason
    assert resolve_quantization(spec(quantization="nf4"), CPU).mode == "nf4"
    assert resolve_quantization(spec(quantization="none"), GPU, bf16_fits=False).mode == "none"


def test_nf4_config_is_the_qlora_recipe():
    import torch

    from tunekit.backends.local.peft_config import quantization_config

    decision = resolve_quantization(spec(quantization="nf4"), GPU)
    cfg = quantization_config(decision)
    assert decision.quantized
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    decision = resolve_quantization(spec(), CPU)
    cfg = quantization_config(decision)
    assert cfg is None and decision.mode == "none"


def test_pissa_with_nf4_is_refused():
    with pytest.raises(ConfigError) as e:
        check_combination(spec(adapter={"init": "pissa_fast"}, quantization="nf4"), QuantDecision("nf4", "asked"))
    assert e.value.field == "adapter.init" and "quantization" in e.value.hint
    # olora re-quantizes its residual itself: allowed with nf4; pissa without quantization: allowed
    check_combination(spec(adapter={"init": "olora"}), QuantDecision("nf4", "asked"))
    check_combination(spec(adapter={"init": "pissa"}), QuantDecision("none", "asked"))


def test_dpo_with_base_rewriting_init_is_refused():
    with pytest.raises(ConfigError) as e:
        check_combination(spec(method="dpo", adapter={"init": "olora"}), QuantDecision("none", "x"))
    assert e.value.field == "adapter.init"
    check_combination(spec(method="dpo", adapter={"use_dora": True}), QuantDecision("none", "x"))


def test_peft_errors_name_the_field():
    from peft import LoraConfig

    with pytest.raises(ValueError) as e:
        LoraConfig(r=4, use_dora=True, lora_bias=True)
    assert peft_error_to_config_error(e.value).field == "adapter.use_dora"
    err = peft_error_to_config_error(ValueError("Target modules {'nope'} not found in the base model."))
    assert err.field == "adapter.target_modules" and "nope" in err.message
