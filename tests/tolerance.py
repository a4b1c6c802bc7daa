"""Numeric tolerances from the floating-point error model, not fitted to the CPU a test was written on.

Two correct implementations of the same arithmetic (another summation order, a fused kernel, a checkpoint
recompute, another CPU: AVX2, AVX-512 and AMX block reductions differently) differ only by rounding. One
rounding to a type moves a value by at most its unit roundoff u, relative (``UNIT_ROUNDOFF``). A reduction of n
terms in another order differs by about u * sqrt(n) times the magnitude of the terms (independent rounding
errors add like a random walk; n * u is the never-reached worst case). So, norm-wise,

    ||a - b|| <= K * u * sqrt(n) * scale                                          (``bound``)

with n the longest reduction in the computation (a weight gradient sums over every token of the batch), scale
the norm of the quantity compared (or of the values it is made of), and K the number of chained operations
whose errors add (a forward and backward pass through a few layers: ``K_PASS``). Norm-wise, not per element:
an element near zero has no relative precision, so an absolute 1e-5 on one element says nothing.

Mixed precision (``mixed_eps``): where two paths differ by fp32 rounding (delta ~ u32 relative) and then round to
bf16, each bf16 rounding moves by one bf16 ulp with probability delta / ulp; the expected difference is delta
but its norm is sqrt(delta * ulp) per value: eps = sqrt(u32 * u16).

Training through Adam (``adam_scale``): Adam divides each gradient by its running rms, so one step moves an
element by at most about lr, whatever the gradient's scale, and a relative gradient error eps changes the step
by about eps * lr. After steps with learning rates lr_t, a tensor of N elements trained by two runs therefore
differs by at most K * eps * sum(lr_t) * sqrt(N) norm-wise; the scale is the furthest training can move it,
known before the run. (Comparing elements after Adam is not meaningful: an element whose gradient is within
rounding of zero takes a step of either sign.)
"""

from __future__ import annotations

import math

# u = 2^-(mantissa bits + 1): the largest relative error of one round-to-nearest
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# errors of the chained operations of one forward + backward pass that add up (matmuls, softmax, norms,
# the residual stream; a few layers): a safety factor, not a fit
K_PASS = 8


def unit_roundoff(dtype) -> float:
    """u of a torch dtype or its name ("bfloat16", torch.bfloat16)."""
    return UNIT_ROUNDOFF[str(dtype).removeprefix("torch.")]


def rounding_eps(dtype, n: int) -> float:
    """Relative error of a result built from reductions of length at most ``n`` in ``dtype``: u * sqrt(n)."""
    return unit_roundoff(dtype) * math.sqrt(n)


def mixed_eps(fine, coarse, n: int) -> float:
    """Two paths that differ by ``fine`` rounding and then both round to ``coarse``: sqrt(u_fine * u_coarse)
    per rounding, times sqrt(n) for the reductions."""
    return math.sqrt(unit_roundoff(fine) * unit_roundoff(coarse)) * math.sqrt(n)


def bound(eps: float, scale: float, k: float = K_PASS) -> float:
    """k * eps * scale: the most two correct computations with relative error ``eps`` may differ by."""
    return k * eps * scale


def adam_scale(lrs, numel: int) -> float:
    """The furthest Adam steps with learning rates ``lrs`` can move a tensor of ``numel`` elements, norm-wise:
    sum(lr) * sqrt(numel). Two runs whose gradients differ by eps relative end within ``bound(eps, this)``."""
    return sum(lrs) * math.sqrt(numel)


def rel_diff(a, b) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n else d


def assert_close(actual, expected, eps: float, *, k: float = K_PASS, scale: float | None = None,
                 what: str = "") -> None:
    """||actual - expected|| <= k * eps * scale, scale = ||expected|| unless given."""
    import torch

    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(expected.norm()) if scale is None else scale
    diff, limit = float((actual - expected).norm()), bound(eps, scale, k)
    assert diff <= limit, f"{what}: ||diff|| {diff:.3g} > {k} * eps {eps:.3g} * scale {scale:.3g} = {limit:.3g}"
