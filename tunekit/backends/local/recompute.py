"""Activations recomputed in backward instead of kept (speed.py's ``recompute_norms`` and ``recompute_mlp``).

A decoder layer that is not checkpointed keeps, for its backward, the outputs of its two RMSNorms: the input of
the q/k/v projections and of the MLP's gate/up projections (their adapters' dL/dA needs it; the base weights are
frozen). Each is norm(x) of a tensor the norm keeps anyway (its input, for its own backward), and computing it is
one pass over [tokens, hidden]. So while such a layer runs forward, saved-tensor hooks
(torch.autograd.graph.saved_tensors_hooks, the mechanism of torch's checkpointing) store a norm output that an op
saves as a reference to the norm and its input, and backward computes it again with the same module, under the
same autocast state: the same kernel on the same input, so the same values. Two [tokens, hidden] tensors per layer
less (8B: 2 x 4,096 of the 55,408 elements per token a fused 4-bit layer keeps, memory._fused_layer_elems).

``recompute_mlp`` goes one step further on the layers the plan names: the MLP's gate and up outputs (the SwiGLU's
inputs, 2 x [tokens, intermediate], half of what such a layer keeps) are computed again in backward by the same
gate/up modules from the recomputed normed state. That is two of a layer's seven GEMMs again, where checkpointing
the layer runs all seven (and attention) again; the plan (speed.py) weighs the two per layer against the memory
budget. The adapters' weights do not change between a step's forward and backward, so the values are the same.

``offload_mlp`` (CUDA): of those layers, the ones `recompute_mlp` names with ``offload`` send the gate/up outputs to
pinned host memory instead, on a side stream while the forward goes on, and backward brings each back one layer
ahead of its use (another side stream), so neither the copies nor a recompute sit on the compute stream. How many
layers the host link can serve without delaying the forward is measured when the run starts (`offload_share`);
a layer whose copy would pass the host-memory budget recomputes instead. The copies are exact.

Only layers not checkpointed: a checkpointed layer keeps its input alone, and hooks inside it would take the
tensors its checkpoint must drop (the innermost hooks win). Not under FSDP2 (kernels.apply's caller): the norms'
weights there are resharded between forward and backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from .memory import _pow2_ceil  # host bytes of a pinned block: CUDA's caching host allocator rounds up to a power of 2


@dataclass
class _Made:
    """One output of the running forward to compute again (``y`` only while the forward runs): ``module`` (a norm,
    or the MLP's gate/up projection) called on ``x``, a tensor kept anyway or, when it is itself recomputed,
    (the _Made that makes it, its layout)."""

    module: Any
    x: Any
    autocast: tuple
    layout: tuple  # (size, stride, storage offset) of the output: the recomputed one must have the same
    y: Any = None  # the output's root tensor (views share it)
    again: Any = None  # the recomputed output, shared by every saved view of it
    host: Any = None  # offload_mlp: the output's pinned host copy (then ``again`` is brought back, not recomputed)
    device: Any = None  # where it is brought back to
    ready: Any = None  # the CUDA event after which ``host`` (sent), then ``again`` (brought back), may be read


@dataclass
class _Saved:
    """What a hook stored for one saved tensor: a view of a recomputed output, or (``tensor``) the tensor itself
    until the layer's forward ends, in case it turns out to be one (`_record`)."""

    made: _Made | None
    size: tuple
    stride: tuple
    offset: int
    tensor: Any = None


@dataclass
class _Layer:
    """One hooked layer: whether its forward is recording now, and the outputs (norms', gate/up's) it recorded."""

    active: bool = False
    made: list = field(default_factory=list)
    mlp: bool = False  # the gate/up outputs are recomputed too (`recompute_mlp`)
    # tensors saved so far in this forward that a later record may claim: a 4-bit DoRA gate/up saves its own
    # output (for the magnitude's gradient) before its forward hook records it
    pending: list = field(default_factory=list)
    index: int = -1  # the decoder layer's index (kernels.set_checkpointing's order)
    offload: Any = None  # the model's _Offload (offload_mlp), on every hooked layer: each one's backward prefetches
    sends: bool = False  # this layer's gate/up outputs go to host memory


@dataclass
class _Offload:
    """offload_mlp's state, one per model: the copy streams, the host-memory budget, and the outputs sent to the
    host in the last forward pass by layer, until backward brings them back."""

    budget: int  # pinned bytes one pass may hold
    down: Any = None  # D2H stream
    up: Any = None  # H2D stream
    sent: dict = field(default_factory=dict)  # layer index -> [_Made] not yet brought back
    held: int = 0  # pinned bytes of ``sent``


def recompute_norms(base: Any) -> int:
    """Give every decoder layer with two RMSNorms (Llama-style names) the hooked forward; returns how many.
    Whether a layer is checkpointed is read at each call (a checkpointed one runs unhooked)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for layer in base.modules():
        if not isinstance(layer, GradientCheckpointingLayer):
            continue
        norms = [getattr(layer, k, None) for k in ("input_layernorm", "post_attention_layernorm")]
        if any(m is None for m in norms) or getattr(vars(layer).get("forward"), "func", None) is _forward:
            continue
        state = _Layer()
        for m in norms:
            m.register_forward_hook(functools.partial(_record, state, False))
        layer.forward = functools.partial(_forward, layer, layer.forward, state)
        n += 1
    return n


def recompute_mlp(base: Any, layers: Any, offload: Any = (), host_budget: int = 0) -> int:
    """Also recompute the gate/up outputs of the decoder layers whose indices are in ``layers`` (after
    `recompute_norms`; the indices count the decoder layers in module order, as kernels.set_checkpointing does);
    those in ``offload`` (CUDA) send them to pinned host memory instead, at most ``host_budget`` bytes per pass.
    Returns how many layers take it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    states = [getattr(vars(b).get("forward"), "args", (None,) * 3)[2] for b in blocks]
    layers, offload = set(layers), set(offload)
    off = _Offload(budget=host_budget) if offload else None
    n = 0
    for i, state in enumerate(states):
        if not isinstance(state, _Layer):
            continue
        state.index = i
        if off is not None and state.offload is None:
            state.offload = off
        mlp = getattr(blocks[i], "mlp", None)
        projs = [getattr(mlp, k, None) for k in ("gate_proj", "up_proj")]
        if i not in layers or state.mlp or any(p is None for p in projs):
            continue
        for p in projs:
            p.register_forward_hook(functools.partial(_record, state, True))
        state.mlp, state.sends = True, i in offload
        n += 1
    return n


def offload_share(layers: int, hidden: int, intermediate: int, layer_params: int, device: Any) -> int:
    """How many of ``layers`` decoder layers can send their gate/up outputs to the host during a forward pass
    without the copies falling behind: each layer's forward takes ~2 x layer_params FLOPs per token and its copy
    2 x intermediate x 2 bytes per token, so the share is the forward's time over one copy's, from a bf16 GEMM
    and a pinned device-to-host copy timed here (a few ms), with a fifth kept in reserve."""
    import torch

    def timed(fn: Any) -> float:
        fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 3 / 1e3

    x = torch.randn(4096, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(intermediate, hidden, device=device, dtype=torch.bfloat16)
    flops = 2 * 4096 * hidden * intermediate / timed(lambda: x @ w.t())
    src = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    host = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
    bandwidth = src.numel() / timed(lambda: host.copy_(src, non_blocking=True))
    forward = 2 * layer_params / flops  # seconds per token, one layer
    copy = 4 * intermediate / bandwidth
    return max(0, min(layers, int(0.8 * layers * forward / copy)))


def _record(state: _Layer, mlp: bool, module: Any, args: tuple, out: Any) -> None:
    import torch

    if not state.active or not args:  # no grad, checkpointed, called outside its layer's forward, or by keyword
        return
    x = args[0]
    src = next((m for m in state.made if m.y is not None and _root(x) is m.y), None)
    dev = out.device.type
    made = _Made(module, x if src is None else (src, _layout(x)),
                 (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)), _layout(out), _root(out))
    state.made.append(made)
    if mlp and state.sends:
        _send(state, made)
    for p in state.pending:  # saved before this record, by the module itself
        if p.tensor is not None and _root(p.tensor) is made.y:
            p.made, p.tensor = made, None


def _send(state: _Layer, m: _Made) -> None:
    """Start copying the output ``m`` recorded to pinned host memory on the D2H stream (within the budget)."""
    import torch

    off, t = state.offload, m.y
    size = t.numel() * t.element_size()
    if (not t.is_cuda or not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != size
            or off.held + _pow2_ceil(size) > off.budget):
        return  # recomputed instead
    if off.down is None:
        off.down, off.up = torch.cuda.Stream(t.device), torch.cuda.Stream(t.device)
    try:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    except RuntimeError:  # the host could not pin that much (a container's limit): recompute, from now on
        off.budget = 0
        return
    off.down.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the compute stream
    with torch.cuda.stream(off.down):
        host.copy_(t, non_blocking=True)
        m.ready = torch.cuda.Event()
        m.ready.record(off.down)  # the host copy is whole after this (the copy back waits for it)
    t.record_stream(off.down)  # its block is not reused before the copy has read it
    m.host, m.device = host, t.device
    off.sent.setdefault(state.index, []).append(m)
    off.held += _pow2_ceil(size)


def _fetch(off: _Offload, m: _Made) -> None:
    """Start bringing ``m``'s host copy back on the H2D stream (once)."""
    import torch

    if m.again is not None:
        return
    dev = m.device
    compute = torch.cuda.current_stream(dev)
    off.up.wait_stream(compute)  # the block it lands in may have been freed by work still queued there
    off.up.wait_event(m.ready)  # and the host copy must be whole (its D2H copy may still be queued)
    with torch.cuda.stream(off.up):
        m.again = m.host.to(dev, non_blocking=True)
        m.ready = torch.cuda.Event()
        m.ready.record(off.up)
    m.again.record_stream(compute)  # read there: its block waits for that before the H2D stream reuses it


def _prefetch(state: _Layer) -> None:
    """In backward, from layer ``state.index`` on: bring back the outputs of the layer below it (backward reaches
    that one next), so its copy runs while this layer's backward computes; one layer ahead, no more (each layer
    brought back holds its gate/up outputs on the GPU until its own backward)."""
    if state.index - 1 in state.offload.sent:
        _bring_back(state.offload, state.index - 1)


def _bring_back(off: _Offload, index: int) -> None:
    for m in off.sent.pop(index, []):
        off.held -= _pow2_ceil(m.host.numel() * m.host.element_size())
        _fetch(off, m)

def _root(t: Any) -> Any:
    return t if t._base is None else t._base


def _layout(t: Any) -> tuple:
    return tuple(t.size()), tuple(t.stride()), t.storage_offset()


def _forward(layer: Any, original: Any, state: _Layer, *args: Any, **kwargs: Any) -> Any:
    import torch

    if not torch.is_grad_enabled() or (layer.gradient_checkpointing and layer.training):
        return original(*args, **kwargs)
    state.active = True
    off = state.offload
    if off is not None and state.sends:  # a pass that never ran backward left its copies: this one replaces them
        for m in off.sent.pop(state.index, []):
            off.held -= _pow2_ceil(m.host.numel() * m.host.element_size())
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, state),
                                                      functools.partial(_unpack, state)):
            return original(*args, **kwargs)
    finally:
        state.active = False
        for m in state.made:
            m.y = None  # the hooks keep the recipe, not the output
        state.made.clear()
        state.pending.clear()


def _pack(state: _Layer, t: Any) -> Any:
    root = _root(t)
    for m in state.made:
        if m.y is not None and root is m.y:
            return _Saved(m, *_layout(t))
    if not state.mlp:
        return t
    held = _Saved(None, *_layout(t), tensor=t)
    state.pending.append(held)
    return held


def _unpack(state: _Layer, saved: Any) -> Any:
    if state.offload is not None and state.offload.sent:
        _prefetch(state)
        if isinstance(saved, _Saved) and saved.made is not None and saved.made.host is not None:
            _bring_back(state.offload, state.index)  # not prefetched (no hooked layer above it ran backward)
    if not isinstance(saved, _Saved):
        return saved
    if saved.made is None:
        return saved.tensor
    return _again(saved.made).as_strided(saved.size, saved.stride, saved.offset)


def _again(m: _Made) -> Any:
    """The output ``m`` recorded, computed again once (and its input first, where that is recomputed too)."""
    import torch

    if m.host is not None:  # offloaded: brought back (prefetched by the layer above, or now), not recomputed
        if m.again is None:
            raise RuntimeError("an offloaded activation was read before it was brought back")
        torch.cuda.current_stream(m.device).wait_event(m.ready)
        return m.again
    if m.again is None:
        x = m.x
        if isinstance(x, tuple):
            src, (size, stride, offset) = x
            x = _again(src).as_strided(size, stride, offset)
        dev, enabled, dtype = m.autocast
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            m.again = m.module(x)
        if _layout(m.again) != m.layout:
            raise RuntimeError(f"the recomputed output of {type(m.module).__name__} is laid out as "
                               f"{_layout(m.again)}, the forward's as {m.layout}; provider_options.local.speedups="
                               f"['-recompute_norms', '-recompute_mlp'] keeps it instead")
    return m.again
