"""DoRA's magnitude gradient against kernels that rewrite layer outputs in place, unseen by autograd (issue 16).

The 4-bit DoRA function (nf4.py) saves its output y for dL/dm = sum_t g * y / m. Liger's Triton kernels rewrite
tensors without bumping autograd's version counters: its RoPE rotates the q/k projections' outputs in the forward,
its SwiGLU writes the gate/up gradients over the gate/up outputs in the backward. Triton is CUDA only, so these
stand-ins do the same on CPU (through ``.data``: the same storage, no version bump) and the gradients are compared
with PEFT's DoRA on the unpatched model. The real kernels: tests/test_local_speed.py's CUDA case.
"""

from __future__ import annotations

import json
import types

import pytest

pytest.importorskip("peft")

from tests.tolerance import assert_close, rel_diff, rounding_eps  # noqa: E402
from tunekit.backends.local import kernels, nf4  # noqa: E402


def _functions():
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import rotate_half

    class InplaceRope(torch.autograd.Function):
        """Liger's RoPE contract: q and k rotated in their own storage, views of them returned."""

        @staticmethod
        def forward(ctx, q, k, cos, sin):
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            for t in (q, k):
                t.data.copy_(t * c + rotate_half(t) * s)
            ctx.save_for_backward(c, s)
            return q.view_as(q), k.view_as(k)

        @staticmethod
        def backward(ctx, dq, dk):
            c, s = ctx.saved_tensors
            return dq * c - rotate_half(dq) * s, dk * c - rotate_half(dk) * s, None, None

    def swiglu_grads(a, b, dc):
        sig = torch.sigmoid(a)
        silu = a * sig
        return dc * (silu * (1 - sig) + sig) * b, dc * silu

    class InplaceSiLUMul(torch.autograd.Function):
        """Liger's SwiGLU contract: saves a and b, writes da and db over them and returns those."""

        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return F.silu(a) * b

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            da, db = swiglu_grads(a, b, dc)
            a.data.copy_(da)
            b.data.copy_(db)
            return a.detach(), b.detach()

    class KeepSiLUMul(InplaceSiLUMul):
        """The same with new gradient tensors (what kernels.py's Liger subclass does on the GPU)."""

        @staticmethod
        def backward(ctx, dc):
            return swiglu_grads(*ctx.saved_tensors, dc)

    return InplaceRope, InplaceSiLUMul, KeepSiLUMul


def _mlp_forward(self, x):  # Liger's SwiGLU MLP forward, with the stand-in bound as self._silu_mul
    return self.down_proj(self._silu_mul.apply(self.gate_proj(x), self.up_proj(x)))


def _model(tiny_model, quant: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, device_map={"": "cpu"}, **kw)
    return get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                        lora_dropout=0.0, use_dora=True))


def _grads(m, ids):
    import torch

    m.train()
    with torch.no_grad():  # magnitudes off their init (m = ||W||), so m/n - 1 is not ~0
        for n, p in m.named_parameters():
            if "magnitude" in n:
                p.mul_(1.0 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _fast(tiny_model, quant, monkeypatch, silu_mul, guard: bool):
    """tunekit's fused DoRA forward under the in-place stand-ins (RoPE in the forward, ``silu_mul`` in the MLP)."""
    from transformers.models.llama import modeling_llama

    rope, _, keep = _functions()
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: rope.apply(q, k, cos,
                                                                                                            sin))
    m = _model(tiny_model, quant)
    for layer in m.base_model.model.model.layers:  # as Liger binds its MLP forward on the instance
        layer.mlp._silu_mul = silu_mul
        layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)
    state = kernels.FastState(fuse_dora=True)
    kernels.patch_lora(m, state)
    kernels.track_forward_passes(m, state)
    if guard:
        done = kernels.guard_dora_outputs(m, state, keep, _mlp_forward)
        layers = len(m.base_model.model.model.layers)
        assert done == ({"dora_copied_outputs": 2 * layers, "dora_swiglu_keeping_inputs": layers} if quant == "nf4"
                        else {"dora_copied_outputs": 0, "dora_swiglu_keeping_inputs": 0})  # 16-bit: not needed
    return m


def _ids():
    import torch

    return torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))


def _eps(tiny_model, ids) -> float:
    n_reduce = max(ids.numel(), json.loads((tiny_model / "config.json").read_text())["intermediate_size"])
    return rounding_eps("float32", n_reduce)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_dora_gradients_equal_peft_under_in_place_rope_and_swiglu(tiny_model, monkeypatch, quant):
    """With the guard kernels.apply installs under Liger (RoPE's q/k inputs copied, the SwiGLU leaving its inputs
    alone), every gradient (magnitudes, A, B) is PEFT's DoRA on the unpatched model to fp32 rounding. The 16-bit
    fused DoRA forward needs no guard: it saves its addmm output, not what it returns."""
    ids = _ids()
    ref = _grads(_model(tiny_model, quant), ids)
    with monkeypatch.context() as mp:  # the MLPs bind the in-place SwiGLU; the guard replaces it (4-bit DoRA)
        fast = _grads(_fast(tiny_model, quant, mp, _functions()[1], guard=True), ids)
    assert fast.keys() == ref.keys() and any("magnitude" in n for n in ref)
    for n, g in ref.items():
        assert_close(fast[n], g, _eps(tiny_model, ids), what=n)


def test_in_place_rope_over_unguarded_dora_outputs_gives_wrong_magnitudes(tiny_model, monkeypatch):
    """The hazard itself (what main computed on the GPU): without the copy, q/k's magnitude gradients are taken
    from the rotated outputs and are wrong by O(1), silently. This is what the first test would catch."""
    ids = _ids()
    ref = _grads(_model(tiny_model, "nf4"), ids)
    with monkeypatch.context() as mp:
        fast = _grads(_fast(tiny_model, "nf4", mp, _functions()[2], guard=False), ids)
        # (the SwiGLU here keeps its inputs: only RoPE acts)
    eps = _eps(tiny_model, ids)
    bad = {n for n, g in ref.items() if rel_diff(fast[n], g) > 0.05}
    assert bad and all("magnitude" in n and (".q_proj." in n or ".k_proj." in n) for n in bad), bad
    for n in set(ref) - bad:
        assert_close(fast[n], ref[n], eps, what=n)


def test_in_place_swiglu_over_unguarded_dora_outputs_is_refused(tiny_model, monkeypatch):
    """A gradient written over the DoRA output it is multiplied with (Liger's SwiGLU backward) is an error from
    nf4.py's function, not a silently wrong magnitude gradient."""
    import torch

    assert nf4._overlaps(torch.zeros(4)[1:3], torch.zeros(4)) is False  # different storages
    t = torch.zeros(8)
    assert nf4._overlaps(t[:4], t[2:6]) and not nf4._overlaps(t[:4], t[4:])
    with monkeypatch.context() as mp:
        m = _fast(tiny_model, "nf4", mp, _functions()[1], guard=False)
        with pytest.raises(RuntimeError, match="wrote its gradient into the layer's output"):
            _grads(m, _ids())
