"""kernels.fuse_swiglu_down: a 4-bit down_proj that takes the SwiGLU's inputs (nf4.swiglu_function) computes what
the SwiGLU followed by the 4-bit LoRA/DoRA function computes, and keeps one [tokens, intermediate] tensor less per
layer (issue 16: fewer checkpointed layers in the same memory).

Liger's SwiGLU is Triton (CUDA only): the MLPs here bind tests/test_local_dora_inplace.py's CPU stand-in of its
contract (saves a and b, writes da and db over them). The real kernels: tests/test_local_speed.py's CUDA case.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("peft")

from tests.test_local_dora_inplace import _functions, _mlp_forward  # noqa: E402
from tunekit.backends.local import kernels, memory, nf4, speed  # noqa: E402


class _Ops:
    """The stand-in's kernels, as fuse_swiglu_down takes them (the backward writes over a and b, as Liger's)."""

    @staticmethod
    def forward(a, b):
        import torch.nn.functional as F

        return F.silu(a) * b

    @staticmethod
    def backward(a, b, dc):
        import torch

        sig = torch.sigmoid(a)
        silu = a * sig
        da, db = dc * (silu * (1 - sig) + sig) * b, dc * silu
        a.copy_(da)
        b.copy_(db)
        return a, b


def _model(tiny_model, dora: bool, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, quantization_config=q,
                                             device_map={"": "cpu"})
    m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                     lora_dropout=dropout, use_dora=dora))
    in_place = _functions()[1]
    for layer in m.base_model.model.model.layers:  # as Liger binds its MLP forward on the instance
        layer.mlp._silu_mul = in_place
        layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)
    state = kernels.FastState(fuse_dora=dora)
    kernels.patch_lora(m, state)
    if dora:
        kernels.track_forward_passes(m, state)
        kernels.guard_dora_outputs(m, state, _functions()[2], _mlp_forward)
    return m, state, in_place


def _step(m, ids, monkeypatch):
    """Loss, gradients and the bytes autograd kept (tests/test_local_recompute.py's count, which also sees what
    recompute.py's hooks keep), with B and the magnitudes off their init first, so that every term of the
    gradients is non-zero."""
    import torch

    from tests.test_local_recompute import _step as counted

    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.mul_(1.0 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
                if "lora_B" in n:
                    p.add_(0.01)
    return counted(m, ids, monkeypatch)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_swiglu_down_computes_the_same_and_keeps_less(tiny_model, monkeypatch, dora):
    """The same loss and gradients, bit for bit (the same kernels in the same order; c = silu(a) * b computed
    again in backward is the same c), and exactly one [tokens, intermediate] tensor per layer less kept."""
    import json

    import torch

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    m, _, _ = _model(tiny_model, dora)
    ref_loss, ref_grads, ref_bytes = _step(m, ids, monkeypatch)

    m, state, in_place = _model(tiny_model, dora)
    layers = len(m.base_model.model.model.layers)
    assert kernels.fuse_swiglu_down(m, state, _Ops, _mlp_forward, in_place) == layers
    fused = []
    real = nf4.swiglu_down
    monkeypatch.setattr(nf4, "swiglu_down", lambda *a: fused.append(real(*a)) or fused[-1])
    loss, grads, kept = _step(m, ids, monkeypatch)

    assert len(fused) == layers and all(y is not None for y in fused)  # every MLP took the fused function
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n and "down_proj" in n for n in grads)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert ref_bytes - kept == layers * ids.numel() * cfg["intermediate_size"] * 4  # fp32 here


@pytest.mark.parametrize("dora", [False, True])
def test_fused_mlp_with_recomputed_gate_and_up(tiny_model, monkeypatch, dora):
    """recompute.py on top of the fused MLP (the 4-bit path the plan combines them on): the SwiGLU's inputs a and b,
    which the fused function keeps (4-bit DoRA's gate/up also keep them as their outputs), are computed again in
    backward; the same loss and gradients bit for bit, and two [tokens, hidden] + two [tokens, intermediate] less
    per layer."""
    import json

    import torch

    from tunekit.backends.local import recompute

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    m, state, in_place = _model(tiny_model, dora)
    kernels.fuse_swiglu_down(m, state, _Ops, _mlp_forward, in_place)
    ref_loss, ref_grads, ref_bytes = _step(m, ids, monkeypatch)

    m, state, in_place = _model(tiny_model, dora)
    kernels.fuse_swiglu_down(m, state, _Ops, _mlp_forward, in_place)
    layers = len(m.base_model.model.model.layers)
    recompute.recompute_norms(m.get_base_model())
    assert recompute.recompute_mlp(m.get_base_model(), range(layers)) == layers
    loss, grads, kept = _step(m, ids, monkeypatch)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert ref_bytes - kept == layers * ids.numel() * (2 * cfg["hidden_size"] + 2 * cfg["intermediate_size"]) * 4


def test_fused_swiglu_down_falls_back_with_dropout(tiny_model, monkeypatch):
    """With adapter dropout the down projection's dropped input is kept anyway: the MLP takes the SwiGLU and the
    down projection as before (and trains)."""
    import torch

    m, state, in_place = _model(tiny_model, False, dropout=0.1)
    kernels.fuse_swiglu_down(m, state, _Ops, _mlp_forward, in_place)
    fused = []
    real = nf4.swiglu_down
    monkeypatch.setattr(nf4, "swiglu_down", lambda *a: fused.append(real(*a)) or fused[-1])
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    loss, grads, _ = _step(m, ids, monkeypatch)
    assert fused and all(y is None for y in fused) and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for n, g in grads.items() if "down_proj.lora_A" in n)


def test_estimate_counts_the_fused_mlp_only_where_it_runs():
    """One intermediate-wide tensor per token and layer less: on the fused CUDA path with a 4-bit base, without
    dropout, on one GPU; the plan asks for it where Liger and the fused forward run."""
    cfg = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, model_type="llama")
    kw = dict(micro_batch=4, max_length=2048, r=16, fused_lm_head=True, kbit_upcast=False, fused_kernels=True,
              gradient_checkpointing=False)

    def acts(**more):
        return memory._estimate(cfg, **{**kw, **more}).breakdown["activations"]

    saved = acts(quantization="nf4") - acts(quantization="nf4", fused_mlp=True)
    # 32 layers x tokens x intermediate x bf16 less kept, and one layer's backward computes it again on top
    assert saved == (32 - 1) * 4 * 2048 * 14336 * 2
    assert acts(quantization="none") == acts(quantization="none", fused_mlp=True)  # 16-bit: not fused
    assert acts(quantization="nf4", lora_dropout=0.05) == acts(quantization="nf4", lora_dropout=0.05, fused_mlp=True)
    assert acts(quantization="nf4", shards=2) == acts(quantization="nf4", shards=2, fused_mlp=True)
    spec = types.SimpleNamespace(method="sft", adapter=types.SimpleNamespace(dropout=0.0))
    assert speed.estimate_kwargs(spec, cfg, "cpu")["fused_mlp"] is False
