"""recompute.py: a layer not checkpointed recomputes its two RMSNorm outputs in backward instead of keeping them:
the same loss and gradients, bit for bit, and exactly two [tokens, hidden] tensors less kept per layer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from tunekit.backends.local import kernels, memory, recompute, speed  # noqa: E402


def _model(tiny_model, quant: str = "none"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, device_map={"": "cpu"}, **kw)
    m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                     lora_dropout=0.0))
    kernels.patch_lora(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return m


def _step(m, ids, monkeypatch):
    """Loss, gradients, and the bytes of the distinct tensors autograd kept (the weights left out). Inside a hooked
    layer recompute.py's hooks are the innermost (they win over this test's): what they keep is counted there."""
    import torch

    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    real = recompute._pack
    monkeypatch.setattr(recompute, "_pack", lambda made, t: pack(real(made, t)))
    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, \
        sum(v for k, v in storages.items() if k not in weights)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_recomputed_norms_give_the_same_gradients_and_keep_less(tiny_model, quant, monkeypatch):
    import torch

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_grads, ref_kept = _step(_model(tiny_model, quant), ids, monkeypatch)
    m = _model(tiny_model, quant)
    layers = len(m.base_model.model.model.layers)
    assert recompute.recompute_norms(m.get_base_model()) == layers
    assert recompute.recompute_norms(m.get_base_model()) == 0  # once
    calls = []
    for layer in m.base_model.model.model.layers:  # the norms run once in forward and once more in backward
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    loss, grads, kept = _step(m, ids, monkeypatch)
    assert calls.count(True) == calls.count(False) == 2 * layers
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    assert ref_kept - kept == layers * 2 * ids.numel() * hidden * 4  # two fp32 [tokens, hidden] per layer


def test_checkpointed_layers_and_no_grad_run_unhooked(tiny_model, monkeypatch):
    """A checkpointed layer keeps its input alone (the hooks stay out of it: the same saved bytes as without);
    without grad nothing is recorded."""
    import torch

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = _model(tiny_model)
    layers = len(ref.base_model.model.model.layers)
    kernels.set_checkpointing(ref.get_base_model(), layers)
    ref_loss, ref_grads, ref_kept = _step(ref, ids, monkeypatch)
    m = _model(tiny_model)
    kernels.set_checkpointing(m.get_base_model(), layers)
    recompute.recompute_norms(m.get_base_model())
    loss, grads, kept = _step(m, ids, monkeypatch)
    assert kept == ref_kept and torch.equal(loss, ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_the_plan_and_the_estimate_count_it():
    cfg = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, model_type="llama")
    kw = dict(micro_batch=4, max_length=2048, r=16, quantization="nf4", fused_lm_head=True, kbit_upcast=False,
              fused_kernels=True)

    def acts(**more):
        return memory._estimate(cfg, **{**kw, **more}).breakdown["activations"]

    # kept layers: two bf16 [tokens, hidden] less each, one computed again on top in a layer's backward; the layer
    # recomputed under checkpointing keeps them (only that transient is added)
    one = 4 * 2048 * 4096 * 2
    assert acts(gradient_checkpointing=False) - acts(gradient_checkpointing=False, recompute_norms=True) == \
        (32 * 2 - 1) * one
    assert acts(gradient_checkpointing=True, recompute_norms=True) - acts(gradient_checkpointing=True) == one
    assert acts(gradient_checkpointing=False, lora_dropout=0.05) == \
        acts(gradient_checkpointing=False, lora_dropout=0.05, recompute_norms=True)  # dropout keeps copies instead
    assert "recompute_norms" in speed.OPTIMISATIONS
    spec = type("S", (), {"method": "sft", "adapter": type("A", (), {"dropout": 0.0})()})()
    assert speed.estimate_kwargs(spec, cfg, "cuda")["recompute_norms"] is True
    assert speed.estimate_kwargs(spec, cfg, "cuda", frozenset({"recompute_norms"}))["recompute_norms"] is False
