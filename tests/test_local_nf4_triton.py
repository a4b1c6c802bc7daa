"""nf4_triton.py's kernel (Triton's CPU interpreter here; compiled on a CUDA machine, where the same tests run on the
GPU): the 4-bit weight dequantized into the wide operand of nf4.py's one-GEMM forward is bitsandbytes'
dequantization bit for bit, so the forward computes what it computed with torch.cat."""

from __future__ import annotations

import os
import types

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from tunekit.backends.local import nf4, nf4_triton  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or its interpreter (tests/conftest.py sets it on CPU)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _small_weights_too(monkeypatch):
    """The kernel serves large weights only (MIN_WEIGHTS); these cases use small ones."""
    monkeypatch.setattr(nf4_triton, "MIN_WEIGHTS", 0)


def _weight(out_f: int, in_f: int, nested: bool, seed: int):
    """A bitsandbytes NF4 weight as nf4.py sees one (packed data + quant state) and its fp32 block scales."""
    from bitsandbytes.functional import quantize_4bit

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16().to(DEV)
    w[0, :5] = 0.0  # exact zeros, and a row with a large value (its block's scale)
    w[1, 3] = 0.5
    packed, qs = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    weight = types.SimpleNamespace(data=packed, quant_state=qs, device=packed.device)
    return weight, packed, nf4.block_scales(qs)


@pytest.mark.parametrize("out_f,in_f,r,nested", [(70, 128, 4, False), (33, 448, 16, True), (128, 1024, 8, True)])
def test_wide_weight_is_bitsandbytes_dequantization_then_cat(out_f, in_f, r, nested):
    """[W | s B | 0] from the kernel equals bitsandbytes' dequantize_4bit followed by torch.cat, bit for bit:
    rows not a multiple of the program's, inputs not a multiple of its columns, double-quantized scales."""
    weight, packed, absmax = _weight(out_f, in_f, nested, out_f)
    bs = torch.randn(out_f, r, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEV)
    width = nf4.wide_width(in_f, r)
    assert nf4_triton.available(weight, torch.bfloat16)
    got = nf4_triton.wide_weight(weight, absmax, bs, width)
    w = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", weight.quant_state.shape,
                                                       torch.bfloat16)
    want = nf4.widen(w, bs, width)
    assert got.shape == (out_f, width) and got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit patterns: signed zeros too
    scaled = absmax * 1.0001  # DoRA folds m/n into the scales: other scales, the same rounding
    w2 = torch.ops.bitsandbytes.dequantize_4bit.default(packed, scaled, 64, "nf4", weight.quant_state.shape,
                                                        torch.bfloat16)
    assert torch.equal(nf4_triton.wide_weight(weight, scaled, bs, width), nf4.widen(w2, bs, width))


def test_the_forward_is_the_same_through_either_path(monkeypatch):
    """nf4._base_plus_update through the kernel and through torch.cat: the same operand, the same GEMM, the same
    output; the switch (TUNING) and anything but bf16 NF4 take torch.cat."""
    weight, packed, absmax = _weight(96, 256, True, 7)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 256, generator=gen).bfloat16().to(DEV)
    h = torch.randn(40, 8, generator=gen).bfloat16().to(DEV)
    bs = torch.randn(96, 8, generator=gen).to(DEV)
    calls = []
    real = nf4_triton.wide_weight
    monkeypatch.setattr(nf4_triton, "wide_weight", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(nf4, "dequant", lambda wt, s, dt: torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, s, 64, "nf4", weight.quant_state.shape, dt))
    fast = nf4._base_plus_update(x, weight, absmax, torch.bfloat16, h, bs)
    assert calls == [1]
    monkeypatch.setitem(nf4_triton.TUNING, "enabled", False)
    assert torch.equal(nf4._base_plus_update(x, weight, absmax, torch.bfloat16, h, bs), fast)
    assert calls == [1]
    monkeypatch.setitem(nf4_triton.TUNING, "enabled", True)
    assert not nf4_triton.available(weight, torch.float32)
    monkeypatch.setattr(nf4_triton, "MIN_WEIGHTS", 96 * 256 + 1)  # smaller than the threshold: torch.cat
    assert not nf4_triton.available(weight, torch.bfloat16)
