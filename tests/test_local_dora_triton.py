"""dora_triton.py's kernels (Triton's CPU interpreter here; compiled on a CUDA machine, where the same tests run on the GPU) against the
torch expressions nf4.py uses without them, and the whole 4-bit DoRA function through them against PEFT
(tests/test_local_speed.py's bf16 case, which takes these kernels wherever Triton imports)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from tunekit.backends.local import dora_triton, nf4  # noqa: E402
from tests.tolerance import assert_close, rounding_eps, unit_roundoff  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or its interpreter (tests/conftest.py sets it on CPU)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("T,N,strided", [(37, 70, False), (300, 1030, False), (64, 48, True)])
def test_magnitude_grad_is_the_fp32_column_dot(T, N, strided):
    """sum_t g y / m per column, accumulated in fp32 from bf16 inputs: within fp32's rounding of a T-long sum
    of the exact (fp64) value, closer to it than torch's product-then-sum (which rounds each product to bf16),
    and 0 where 1/m is 0 (m == 0)."""
    gen = torch.Generator().manual_seed(T)
    g = torch.randn(T, N + 5 if strided else N, generator=gen).bfloat16().to(DEV)
    y = torch.randn(T, N, generator=gen).bfloat16().to(DEV)
    if strided:  # a column slice: rows 5 elements apart from the next
        g = g[:, 5:]
        assert g.stride(0) == N + 5
    inv = torch.rand(N, generator=gen).to(DEV) + 0.5
    inv[3] = 0.0
    assert dora_triton.available(g.device)
    got = dora_triton.magnitude_grad(g, y, inv)
    exact = (g.double() * y.double()).sum(0) * inv.double()
    assert got.dtype == torch.float32 and got.shape == (N,) and got[3] == 0
    assert_close(got, exact, rounding_eps("float32", T), what="kernel vs fp64")
    torch_path = (g * y).sum(0, dtype=torch.float32) * inv
    assert (got.double() - exact).norm() <= (torch_path.double() - exact).norm()


def _nf4_weight(out_f: int, in_f: int, seed: int):
    """A bitsandbytes NF4 Params4bit (double quantization, blocksize 64), as Linear4bit holds it."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02
    packed, qs = F.quantize_4bit(w.to(DEV), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, quant_type="nf4", blocksize=64,
                             compress_statistics=True, bnb_quantized=True)


@pytest.mark.parametrize("out_f,in_f,r,layers", [(96, 192, 8, 2), (200, 448, 16, 1), (64, 1024, 4, 3)])
def test_nf4_times_at_equals_dequantize_then_multiply(out_f, in_f, r, layers):
    """W A^T with W dequantized in registers: the same bf16 weights (bitsandbytes' NF4 code times the block
    scale, rounded once) and fp32 accumulation as dequantize_4bit + torch.mm, so the two differ by the order of
    an in_f-long fp32 sum; a wrong nibble order, block scale or A column would be off by O(1)."""
    weights = [_nf4_weight(out_f, in_f, seed) for seed in range(layers)]
    absmax = [nf4.block_scales(w.quant_state) for w in weights]
    a = (torch.randn(layers, r, in_f, generator=torch.Generator().manual_seed(9)) * 0.1).bfloat16().to(DEV)
    assert dora_triton.available(a.device)
    got = dora_triton.nf4_times_at(weights, absmax, a, nf4.dequant)
    assert got.shape == (layers, out_f, r) and got.dtype == torch.float32
    for i, (w, s) in enumerate(zip(weights, absmax)):
        wd = nf4.dequant(w, s, torch.bfloat16)
        exact = wd.double() @ a[i].double().t()  # the same rounded weights and operands, summed exactly
        assert_close(got[i], exact, rounding_eps("float32", in_f), what=f"layer {i}")
        # the torch path (its output rounded to bf16) is within one bf16 rounding of the same value
        assert_close(torch.mm(wd, a[i].t()), exact, unit_roundoff("bfloat16"), what="torch path")


def test_the_torch_path_is_taken_when_disabled_or_fp32(monkeypatch):
    """TUNING["enabled"] = False (and compute dtypes other than bf16: the kernel rounds W to bf16) keep the torch
    expressions: the kernels are an implementation, not a change of what is computed."""
    calls = []
    real = dora_triton._kernels
    monkeypatch.setattr(dora_triton, "_kernels", lambda: calls.append(1) or real())
    w = [_nf4_weight(64, 128, 0)]
    s = [nf4.block_scales(w[0].quant_state)]
    a32 = torch.randn(1, 8, 128).to(DEV)
    out = dora_triton.nf4_times_at(w, s, a32, nf4.dequant)
    assert len(calls) == 1  # available() looked; no launch for fp32
    assert_close(out[0], nf4.dequant(w[0], s[0], torch.float32) @ a32[0].t(), rounding_eps("float32", 128))
    launched = len(calls)
    monkeypatch.setitem(dora_triton.TUNING, "enabled", False)
    g = torch.randn(16, 32).bfloat16().to(DEV)
    got = dora_triton.magnitude_grad(g, g, torch.ones(32, device=DEV))
    assert torch.equal(got, (g * g).sum(0, dtype=torch.float32))
    assert len(calls) == launched  # no kernel after the switch
