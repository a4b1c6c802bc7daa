"""dora_triton.py's kernel (Triton's CPU interpreter here; compiled on a CUDA machine, where the same tests run on
the GPU) against the torch expression nf4.py uses without it. The whole 4-bit DoRA function through it against
PEFT is tests/test_local_speed.py's nf4 case, which takes the kernel wherever Triton imports."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from tunekit.backends.local import dora_triton  # noqa: E402
from tests.tolerance import assert_close, rounding_eps  # noqa: E402

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


def test_the_torch_path_is_taken_when_disabled(monkeypatch):
    """TUNING["enabled"] = False keeps the torch expression (benchmarks' --dora-ab): the kernel is an
    implementation, not a change of what is computed."""
    calls = []
    real = dora_triton._kernels
    monkeypatch.setattr(dora_triton, "_kernels", lambda: calls.append(1) or real())
    dora_triton._importable.cache_clear()
    g = torch.randn(16, 32).bfloat16().to(DEV)
    dora_triton.magnitude_grad(g, g, torch.ones(32, device=DEV))
    assert len(calls) == 2  # available() looked (once: cached), then the launch
    monkeypatch.setitem(dora_triton.TUNING, "enabled", False)
    got = dora_triton.magnitude_grad(g, g, torch.ones(32, device=DEV))
    assert torch.equal(got, (g * g).sum(0, dtype=torch.float32))
    assert len(calls) == 2  # no kernel after the switch
