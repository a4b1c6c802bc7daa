"""LoRA and DoRA on a bitsandbytes 4-bit base: one autograd function per layer call (kernels.py's fast path).

One function instead of bitsandbytes' matmul + PEFT's lora_A/lora_B modules + the epilogue: the same GEMMs
(forward: A, then base and B as one GEMM so that base + update is rounded once; backward: base, A, and the
two adapter gradients) with less Python per call and no fp32 copy of the input.

DoRA: (m/n) * (W x + s B A x) = (diag(m/n) W) x + s (diag(m/n) B) A x, and diag(m/n) W is what the 4-bit
dequantization yields when each row's block scales (absmax, fp32) are multiplied by m/n first, so no pass
over the [tokens, out] activations rescales them (PEFT's DoRA makes 3-4). Products are formed in fp32
before the single rounding to the compute dtype, so m/n - 1 ~ 1e-4 is not lost the way it would be in a
16-bit factor. The norm n = ||W + s B A|| (detached, as in PEFT) and everything derived from it are computed
once per forward pass for all DoRA layers together, batched over the layers of one shape (a step is bound by
per-op overhead, not by these small products); the checkpoint recompute reuses them.

On CUDA the magnitude's gradient runs as dora_triton.py's kernel (one pass over g and y).

The magnitude's gradient reads the layer's output y (saved; it is also what the layer returns, which costs
nothing where the next op keeps it anyway). Liger's Triton kernels rewrite tensors in place without bumping
autograd's version counters, so neither a saved tensor's check nor anything else would notice: its RoPE rotates
the q/k outputs in the forward (those layers, ``state.copy_out``, return a copy instead), its SwiGLU writes the
gate/up gradients into the gate/up outputs in the backward (kernels.py gives those MLPs a SwiGLU that leaves its
inputs alone); a gradient that arrives in y's own storage is refused here rather than used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import dora_triton, nf4_triton


def lora_forward(layer: Any, x: Any, name: str, dora: Any, state: Any) -> Any:
    """The layer's output through the 4-bit function, or None where it does not apply (generic path then).

    ``dora``: the layer's DoraLinearLayer, only when PEFT's DoRA forward has no active dropout. ``state``: the
    model's kernels.FastState (pass counter, the DoRA layers to compute together, cached values)."""
    got = _prepared(layer, x, name, dora, state)
    if got is None:
        return None
    A, B, mag, weight, pre, s, cdt = got
    if mag is None:
        return _function().apply(x, layer.lora_dropout[name](x), A, B, None, weight, pre, s, cdt, False)
    copy = layer in getattr(state, "copy_out", ())  # a later kernel rewrites this output in place (RoPE)
    return _function().apply(x, x, A, B, mag, weight, pre, s, cdt, copy)


def swiglu_down(layer: Any, a: Any, b: Any, name: str, dora: Any, state: Any, ops: Any, keep: bool) -> Any:
    """``layer(silu(a) * b)`` for the MLP's down projection as one function (`swiglu_function`), or None where it
    does not apply: the 4-bit function does not (see `lora_forward`), or the adapter has dropout (its dropped
    copy of the input would be saved anyway)."""
    import torch

    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    got = _prepared(layer, a, name, dora, state)
    return None if got is None else swiglu_function().apply(a, b, *got, ops, keep)


def _prepared(layer: Any, x: Any, name: str, dora: Any, state: Any) -> tuple | None:
    """(A, B, magnitude or None, 4-bit weight, Pre, s, compute dtype) of one call, or None where the 4-bit
    function does not apply."""
    import torch

    base = layer.get_base_layer()
    if not eligible(base):
        return None
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    cdt = getattr(base, "compute_dtype", None) or x.dtype
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == A.dtype == B.dtype == cdt):
        return None  # mixed dtypes without autocast: PEFT's promotion rules apply
    s = float(layer.scaling[name])
    if dora is None:
        with torch.no_grad():
            pre = Pre(a=A.to(cdt), absmax=block_scales(base.weight.quant_state), bs=(B.float() * s).to(cdt))
        return A, B, None, base.weight, pre, s, cdt
    return A, B, dora.weight, base.weight, dora_pass(layer, name, cdt, state), s, cdt


def eligible(base: Any) -> bool:
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    return (qs is not None and qs.quant_type in ("nf4", "fp4") and getattr(base, "bias", None) is None
            # bitsandbytes' CPU inference layout (repacked weights, transposed scales) is not the GPU one
            and not getattr(qs, "packing_format_for_cpu", False)
            # a block straddling two rows could not take a per-row DoRA factor
            and qs.shape[1] % qs.blocksize == 0)


@dataclass
class Pre:
    """What one call needs besides the differentiable inputs (computed without autograd)."""

    a: Any  # A in the compute dtype
    absmax: Any  # fp32 block scales; DoRA: before the per-row factor (applied per call)
    bs: Any  # s * B (DoRA: s * diag(m/n) B) in the compute dtype
    scale: Any = None  # DoRA: m/n, fp32 [out]
    coef: Any = None  # DoRA: s * m/n
    inv_mag: Any = None  # DoRA: 1/m (0 where m == 0)
    pass_id: int | None = None


def block_scales(qs: Any) -> Any:
    """The fp32 absmax of every 4-bit block (double quantization undone)."""
    if not qs.nested:
        return qs.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


def dequant(weight: Any, absmax: Any, dtype: Any) -> Any:
    import torch

    qs = weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, qs.blocksize, qs.quant_type, qs.shape,
                                                          dtype)


# ------------------------------------------------------------------------------------------------ DoRA per pass

def dora_pass(layer: Any, name: str, cdt: Any, state: Any) -> Pre:
    """This forward pass's DoRA values of ``layer`` (computed for every registered DoRA layer at once on the
    first call of a pass; without a pass counter, for this layer alone on every call)."""
    counted = state.passes is not None
    pre = state.cache.get((layer, "nf4_dora"))
    if counted and pre is not None and pre.pass_id == state.passes:
        return pre
    layers = [(m, n) for m, n in state.nf4_dora if eligible(m.get_base_layer())] if counted else []
    if (layer, name) not in layers:
        layers = [(layer, name)]
    _compute_pass(layers, cdt, state)
    return state.cache[(layer, "nf4_dora")]


def _compute_pass(layers: list[tuple[Any, str]], cdt: Any, state: Any) -> None:
    import torch

    groups: dict[tuple, list[tuple[Any, str]]] = {}
    for m, n in layers:
        A, B = m.lora_A[n].weight, m.lora_B[n].weight
        key = (tuple(m.get_base_layer().weight.quant_state.shape), A.shape[0], float(m.scaling[n]), A.dtype,
               B.dtype, A.device)
        groups.setdefault(key, []).append((m, n))
    with torch.no_grad():
        for (_, _, s, *_), members in groups.items():
            absmax, wsq = zip(*(_frozen_stats(m.get_base_layer(), cdt, state.cache) for m, _ in members))
            A = torch.stack([m.lora_A[n].weight for m, n in members]).float()  # [L, r, in]
            B = torch.stack([m.lora_B[n].weight for m, n in members]).float()  # [L, out, r]
            mag = torch.stack([m.lora_magnitude_vector[n].weight for m, n in members]).float()  # [L, out]
            a = A.to(cdt)
            WA = torch.empty(B.shape, dtype=cdt, device=B.device)
            for i, (m, _) in enumerate(members):  # W A^T: one pass over each dequantized W per forward pass
                torch.mm(dequant(m.get_base_layer().weight, absmax[i], cdt), a[i].t(), out=WA[i])
            scale = mag / dora_norm(torch.stack(wsq), WA, A, B, s)
            coef = scale * s
            inv_mag = torch.where(mag != 0, mag.reciprocal(), torch.zeros((), device=mag.device))
            bs = (B * coef.unsqueeze(-1)).to(cdt)
            for i, (m, _) in enumerate(members):
                state.cache[(m, "nf4_dora")] = Pre(a=a[i], absmax=absmax[i], bs=bs[i], scale=scale[i],
                                                   coef=coef[i], inv_mag=inv_mag[i], pass_id=state.passes)


def dora_norm(wsq: Any, WA: Any, A: Any, B: Any, s: float) -> Any:
    """DoRA's weight norm ||W_i + s (B A)_i|| in fp32 from ||W_i||^2 (``wsq``) and W A^T (``WA``):
    ||W_i||^2 + 2 s <W_i A^T, B_i> + s^2 B_i (A A^T) B_i^T. Also batched: leading dimensions of all arguments
    are layers (this module's per-pass batch); kernels.py's 16-bit path calls it for one layer."""
    import torch

    A, B = A.float(), B.float()
    M = torch.add(WA.float(), B @ (A @ A.transpose(-1, -2)), alpha=s / 2)  # W A^T + (s/2) B A A^T
    return (wsq + (2 * s) * (M * B).sum(-1)).clamp_min_(0).sqrt_()


def _frozen_stats(base: Any, cdt: Any, cache: dict) -> tuple[Any, Any]:
    """(fp32 block scales, ||W_i||^2 per row) of a frozen 4-bit weight, computed once per weight."""
    w = base.weight
    key = (w.data_ptr(), cdt)
    got = cache.get((base, "frozen"))
    if got is None or got[0] != key:
        absmax = block_scales(w.quant_state)
        got = cache[(base, "frozen")] = (key, absmax, dequant(w, absmax, cdt).float().pow(2).sum(1))
    return got[1], got[2]


# ------------------------------------------------------------------------------------------------ the function

def _base_plus_update(x: Any, weight: Any, absmax: Any, cdt: Any, h: Any, bs: Any) -> Any:
    """x W^T + h bs^T rounded to the compute dtype once: one GEMM over [x | h] and [W | bs] (fp32 accumulation), W
    the 4-bit ``weight`` dequantized with the fp32 block scales ``absmax``.

    Not addmm(h bs^T, x, W^T): cuBLAS rounds the product to bf16 before adding C (measured on an H200: half of
    a random update at 1e-3 of the base kept, as with a separate add), so the first steps' updates, below half
    an ulp of the base output, were mostly lost and the loss lagged the plain recipe's, which adds them in
    fp32. The forward only: the adapter's share of dL/dx is as small, but losing part of it perturbs earlier
    layers' gradients by ~1e-3 relative, where in the forward it cancels the update itself (the loss check
    matches with the backward's epilogue left as is). K is padded to a multiple of 8 (16-byte rows for the
    tensor cores). [x | h] is one ``torch.cat`` (writing x into a column slice of a wider buffer ran as ~1,600
    strided copies per step on the generic elementwise kernel: 83 ms of a QLoRA step's profile,
    docs/benchmarks.md); [W | bs] is written by the dequantization itself where nf4_triton's kernel runs (CUDA,
    bf16), else dequantized and concatenated.
    """
    width = wide_width(x.shape[1], h.shape[1])
    if cdt == x.dtype and nf4_triton.available(weight, cdt):
        wide = nf4_triton.wide_weight(weight, absmax, bs.to(cdt), width)
    else:
        wide = widen(dequant(weight, absmax, cdt), bs, width)
    return one_gemm(x, h, wide)


def wide_width(k: int, r: int) -> int:
    """Columns of the one-GEMM operands: K + r padded to a multiple of 8 (16-byte rows for the tensor cores)."""
    return k + r + (-(k + r) % 8)


def widen(w: Any, bs: Any, width: int) -> Any:
    """[w | bs | 0], ``width`` columns."""
    import torch

    pad = width - w.shape[1] - bs.shape[1]
    return torch.cat([w, bs.to(w.dtype)] + ([w.new_zeros(w.shape[0], pad)] if pad else []), 1)


def one_gemm(x: Any, h: Any, wide: Any) -> Any:
    """[x | h | 0] wide^T: x W^T + h bs^T with one rounding, ``wide`` = [W | bs | 0]."""
    import torch

    return torch.mm(widen(x, h, wide.shape[1]), wide.t())


_FN: dict = {}  # built on first use (torch is imported lazily)


def _function():
    if "lora" not in _FN:
        _FN["lora"], _FN["swiglu"] = _make()
    return _FN["lora"]


def swiglu_function():
    """``apply(a, b, A, B, mag, weight, pre, s, cdt, ops, keep)``: down_proj(silu(a) * b) as one function."""
    _function()
    return _FN["swiglu"]


def _make():
    import torch

    def forward(x2, xd2, weight, pre, cdt):
        """y (flat, cdt) and the block scales used; the caller saves what its backward needs."""
        absmax = pre.absmax
        if pre.scale is not None:
            absmax = (absmax.view(weight.quant_state.shape[0], -1) * pre.scale.view(-1, 1)).view(-1)
        h = xd2 @ pre.a.t()
        return _base_plus_update(x2, weight, absmax, cdt, h, pre.bs), absmax, h

    def remember(ctx, weight, s, pre, cdt, same, A, B, mag):
        ctx.weight, ctx.s, ctx.coef, ctx.cdt, ctx.same = weight, s, pre.coef, cdt, same
        ctx.dtypes = (A.dtype, B.dtype, None if mag is None else mag.dtype)

    def backward(ctx, g, xd2, h, a, bs, absmax, dora, need_x, need_xd, need_a, need_b, need_m):
        """(dL/dx, dL/dxd, dL/dA, dL/dB, dL/dm), flat and in the compute dtype for the inputs."""
        cdt = ctx.cdt
        g2 = g.reshape(-1, g.shape[-1]).to(cdt)
        gx = gxd = gA = gB = gm = None
        gh = g2 @ bs if (need_xd or need_a) else None  # dL/dh, [tokens, r]
        if need_x:
            gx = g2 @ dequant(ctx.weight, absmax, cdt)
            if ctx.same:  # xd is x: one gradient, the adapter's term added in the GEMM's epilogue
                gx = gx.addmm_(gh, a)
        if need_xd and not ctx.same:
            gxd = gh @ a
        if need_a:
            gA = (gh.t() @ xd2).to(ctx.dtypes[0])
        if need_b:
            gB = (g2.t() @ h).float()
            gB = (gB * (ctx.s if ctx.coef is None else ctx.coef.view(-1, 1))).to(ctx.dtypes[1])
        if need_m:
            # dL/dm = (1/n) sum_t g * y/(m/n) = sum_t g*y / m  (y = (m/n) y0; rows with m == 0 get 0)
            y, inv_mag = dora
            if _overlaps(g, y):
                raise RuntimeError(
                    "a kernel after this DoRA layer wrote its gradient into the layer's output, which the "
                    "magnitude's gradient reads (Liger's SwiGLU does): the layer must return a copy "
                    "(kernels.FastState.copy_out) or the kernel keep its inputs (kernels.guard_dora_outputs)")
            gm = dora_triton.magnitude_grad(g2, y, inv_mag).to(ctx.dtypes[2])
        return gx, gxd, gA, gB, gm

    def dora_saved(y, pre, mag):
        return () if mag is None else (y, pre.inv_mag)

    class Nf4Lora(torch.autograd.Function):
        """y = x W^T + (xd a^T) bs^T, xd = dropout(x), bs = s B; DoRA: W's block scales times m/n and
        bs = s diag(m/n) B, so y = diag(m/n) (x W^T + s (x A^T) B^T). W is 4-bit and frozen. ``copy``: return a
        copy of y, not y (DoRA saves y; a later kernel rewrites the output in place)."""

        @staticmethod
        def forward(ctx, x, xd, A, B, mag, weight, pre, s, cdt, copy):
            x2 = x.reshape(-1, x.shape[-1]).to(cdt)
            xd2 = x2 if xd is x else xd.reshape(-1, xd.shape[-1]).to(cdt)
            y, absmax, h = forward(x2, xd2, weight, pre, cdt)
            ctx.save_for_backward(xd2, h, pre.a, pre.bs, absmax, *dora_saved(y, pre, mag))
            remember(ctx, weight, s, pre, cdt, xd is x, A, B, mag)
            ctx.shapes = (x.shape, x.dtype, xd.shape, xd.dtype)
            out = y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
            return out.clone() if copy and out.data_ptr() == y.data_ptr() else out

        @staticmethod
        def backward(ctx, g):
            xd2, h, a, bs, absmax, *dora = ctx.saved_tensors
            x_shape, x_dtype, xd_shape, xd_dtype = ctx.shapes
            gx, gxd, gA, gB, gm = backward(ctx, g, xd2, h, a, bs, absmax, dora, *ctx.needs_input_grad[:5])
            gx = None if gx is None else gx.view(x_shape).to(x_dtype)
            gxd = None if gxd is None else gxd.view(xd_shape).to(xd_dtype)
            return gx, gxd, gA, gB, gm, None, None, None, None, None

    class Nf4LoraSwiGLU(torch.autograd.Function):
        """The same layer fed by the MLP's SwiGLU, both in one function: y = Nf4Lora(silu(a) * b) without dropout
        (``ops``: ``forward(a, b) -> c`` and ``backward(a, b, dc) -> (da, db)``, Liger's kernels on the GPU).

        Saves a and b, which the SwiGLU's backward needs anyway, instead of c = silu(a) * b, which the adapter's
        dL/dA needs: c is computed again in backward by the same kernel (one elementwise pass), so the values are
        those of the two functions in a row and each layer keeps [tokens, intermediate] less. ``keep``: the
        SwiGLU's backward writes into copies of a and b (4-bit DoRA gate/up save their outputs), not over them."""

        @staticmethod
        def forward(ctx, a, b, A, B, mag, weight, pre, s, cdt, ops, keep):
            with torch.no_grad():
                c = ops.forward(a, b)
            c2 = c.reshape(-1, c.shape[-1]).to(cdt)
            y, absmax, h = forward(c2, c2, weight, pre, cdt)
            ctx.save_for_backward(a, b, h, pre.a, pre.bs, absmax, *dora_saved(y, pre, mag))
            remember(ctx, weight, s, pre, cdt, True, A, B, mag)
            ctx.ops, ctx.keep = ops, keep
            return y.view(*c.shape[:-1], y.shape[-1]).to(c.dtype)

        @staticmethod
        def backward(ctx, g):
            a, b, h, pa, bs, absmax, *dora = ctx.saved_tensors
            need_a, need_b, need_m = ctx.needs_input_grad[2:5]
            need_ab = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # one SwiGLU backward gives both
            c = ctx.ops.forward(a, b) if need_a else None  # dL/dA = gh^T c
            c2 = None if c is None else c.reshape(-1, c.shape[-1]).to(ctx.cdt)
            dc, _, gA, gB, gm = backward(ctx, g, c2, h, pa, bs, absmax, dora, need_ab, False, need_a, need_b,
                                         need_m)
            da = db = None
            if need_ab:
                if ctx.keep:
                    a, b = a.clone(), b.clone()
                da, db = ctx.ops.backward(a, b, dc.view(a.shape).to(a.dtype).contiguous())
            return da, db, gA, gB, gm, None, None, None, None, None, None

    return Nf4Lora, Nf4LoraSwiGLU


def _overlaps(a: Any, b: Any) -> bool:
    """Whether two tensors share memory (same storage, overlapping byte ranges)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    lo_a, lo_b = a.data_ptr(), b.data_ptr()
    return lo_a < lo_b + b.numel() * b.element_size() and lo_b < lo_a + a.numel() * a.element_size()
