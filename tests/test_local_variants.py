"""variants.py: one strategy per adapter choice, checked against what PEFT itself builds; and the local backend's
speed plan sits below the patches."""

from __future__ import annotations

import ast
import json
import math
import typing
from pathlib import Path

import pytest

from tunekit.backends.local import variants
from tunekit.backends.local.memory import lora_params
from tunekit.backends.local.peft_config import lora_kwargs
from tunekit.schemas.spec import AdapterConfig, TrainingSpec

LOCAL = Path(variants.__file__).parent


def _local_imports(path: Path) -> set[str]:
    """Sibling modules a module imports, at module level or inside functions (a lazy import is a dependency too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_the_speed_plan_is_below_the_patches():
    # (no circle anywhere in tunekit: tests/test_import_graph.py)
    graph = {p.stem: _local_imports(p) for p in LOCAL.glob("*.py")}
    # the speed plan is pure, the patches use it and the 4-bit function, never the other way round
    assert "kernels" not in graph["speed"] | graph["nf4"] and "speed" not in graph["nf4"]


def test_every_spec_init_has_a_strategy_and_peft_accepts_its_kwargs():
    from peft import LoraConfig

    inits = typing.get_args(AdapterConfig.model_fields["init"].annotation)
    assert set(variants.INITS) == set(inits)
    for init in inits:
        for dora in (False, True):
            spec = TrainingSpec(base_model="m", adapter={"init": init, "use_dora": dora, "use_rslora": True, "r": 4})
            cfg = LoraConfig(**lora_kwargs(spec))
            assert (cfg.init_lora_weights, cfg.use_dora, cfg.use_rslora) == (variants.INITS[init].peft, dora, True)


def test_of_picks_one_strategy_of_each_kind():
    v = variants.of(AdapterConfig())
    assert (v.form, v.init.name, v.scaling, v.optimizer) == (variants.LORA, "default", variants.STANDARD,
                                                             variants.PLAIN)
    v = variants.of(AdapterConfig(use_dora=True, use_rslora=True, init="olora", loraplus_lr_ratio=8))
    assert (v.form, v.scaling, v.optimizer) == (variants.DORA, variants.RSLORA, variants.LoraPlus(8))
    assert v.init.mutates_base and not v.init.needs_full_precision
    assert v.optimizer.name("adamw_bnb_8bit", quantized=True) == "loraplus+adamw_bnb_8bit"
    assert v.optimizer.name("adamw_torch_fused", quantized=True) == "loraplus+adamw_torch"
    assert v.optimizer.name("adamw_torch_fused", quantized=False) == "loraplus+adamw_torch"
    assert variants.PLAIN.name("adamw_torch_fused", quantized=False) == "adamw_torch_fused"


@pytest.mark.parametrize("planned, cls", [("loraplus+adamw_torch", "torch.optim.adamw.AdamW"),
                                          ("loraplus+adamw_bnb_8bit", "bitsandbytes.optim.adamw.AdamW8bit")])
def test_loraplus_builds_the_class_its_planned_name_says(planned, cls):
    """A run recorded with bitsandbytes' 8-bit AdamW (QLoRA before resolve.optimizer_name moved to fp32 state)
    resumes with it: LoRA+ builds by the planned name, two learning rates either way."""
    torch = pytest.importorskip("torch")
    if "8bit" in planned:
        pytest.importorskip("bitsandbytes")
    model = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 2, bias=False), "lora_B": torch.nn.Linear(2, 4, bias=False)})
    hp = TrainingSpec(base_model="m").hyperparameters
    opt = variants.LoraPlus(16.0).build(model, hp, planned, on_gpu=False)
    assert f"{type(opt).__module__}.{type(opt).__name__}" == cls
    assert len({g["lr"] for g in opt.param_groups if g["params"]}) == 2


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_config_of_a_converted_init_keeps_the_scale(rslora):
    spec = TrainingSpec(base_model="m", adapter={"init": "pissa", "r": 8, "alpha": 16, "use_rslora": rslora})
    lkw = lora_kwargs(spec)
    saved = variants.of(spec.adapter).saved_config(lkw)
    assert saved["r"] == 16 and saved["init_lora_weights"] is True and saved["converted_from"] == "pissa"

    def scale(c):
        return c["lora_alpha"] / (math.sqrt(c["r"]) if rslora else c["r"])

    assert scale(saved) == pytest.approx(scale(lkw))
    plain = TrainingSpec(base_model="m", adapter={"r": 8, "alpha": 16, "use_rslora": rslora})
    assert variants.of(plain.adapter).saved_config(lora_kwargs(plain)) == lora_kwargs(plain)


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_params_match_peft(tiny_model, use_dora):
    """The form's parameter count (memory.py's adapter term) is what PEFT trains: DoRA adds its magnitudes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_model / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    assert lora_params(cfg, 4, use_dora=use_dora) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
