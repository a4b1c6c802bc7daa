"""Shared helpers for the merge/serve tests: small PEFT adapters made in code on the tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_adapter(base: Path, out: Path, *, r: int = 8, target_modules: Any = ("q_proj", "v_proj"),
                 seed: int = 1, b_std: float = 0.5, **lora_kwargs: Any) -> Path:
    """Save a LoRA adapter with random non-zero B (so adapters differ from the base and from each other)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(base)
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_kwargs.pop("lora_alpha", 2 * r),
                                                  target_modules=tm, task_type="CAUSAL_LM", **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
            elif "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
    peft_model.save_pretrained(out)
    return out


def peft_greedy(base: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> str:
    """Reference output: transformers generate on the base or on PeftModel(base, adapter), greedy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
