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

Only layers not checkpointed: a checkpointed layer keeps its input alone, and hooks inside it would take the
tensors its checkpoint must drop (the innermost hooks win). Not under FSDP2 (kernels.apply's caller): the norms'
weights there are resharded between forward and backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


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
    """One hooked layer: whether its forward is recording now, and the norm outputs it recorded."""

    active: bool = False
    made: list = field(default_factory=list)
    mlp: bool = False  # the gate/up outputs are recomputed too (`recompute_mlp`)
    # tensors saved so far in this forward that a later record may claim: a 4-bit DoRA gate/up saves its own
    # output (for the magnitude's gradient) before its forward hook records it
    pending: list = field(default_factory=list)


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
            m.register_forward_hook(functools.partial(_record, state))
        layer.forward = functools.partial(_forward, layer, layer.forward, state)
        n += 1
    return n


def recompute_mlp(base: Any, layers: Any) -> int:
    """Also recompute the gate/up outputs of the decoder layers whose indices are in ``layers`` (after
    `recompute_norms`; the indices count the decoder layers in module order, as kernels.set_checkpointing does).
    Returns how many layers take it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    n = 0
    for i in sorted(set(layers)):
        state = getattr(vars(blocks[i]).get("forward"), "args", (None,) * 3)[2] if i < len(blocks) else None
        mlp = getattr(blocks[i], "mlp", None) if i < len(blocks) else None
        projs = [getattr(mlp, k, None) for k in ("gate_proj", "up_proj")]
        if not isinstance(state, _Layer) or state.mlp or any(p is None for p in projs):
            continue
        for p in projs:
            p.register_forward_hook(functools.partial(_record, state))
        state.mlp = True
        n += 1
    return n


def _record(state: _Layer, module: Any, args: tuple, out: Any) -> None:
    import torch

    if not state.active or not args:  # no grad, checkpointed, called outside its layer's forward, or by keyword
        return
    x = args[0]
    src = next((m for m in state.made if m.y is not None and _root(x) is m.y), None)
    dev = out.device.type
    made = _Made(module, x if src is None else (src, _layout(x)),
                 (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)), _layout(out), _root(out))
    state.made.append(made)
    for p in state.pending:  # saved before this record, by the module itself
        if p.tensor is not None and _root(p.tensor) is made.y:
            p.made, p.tensor = made, None


def _root(t: Any) -> Any:
    return t if t._base is None else t._base


def _layout(t: Any) -> tuple:
    return tuple(t.size()), tuple(t.stride()), t.storage_offset()


def _forward(layer: Any, original: Any, state: _Layer, *args: Any, **kwargs: Any) -> Any:
    import torch

    if not torch.is_grad_enabled() or (layer.gradient_checkpointing and layer.training):
        return original(*args, **kwargs)
    state.active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, state), _unpack):
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


def _unpack(saved: Any) -> Any:
    if not isinstance(saved, _Saved):
        return saved
    if saved.made is None:
        return saved.tensor
    return _again(saved.made).as_strided(saved.size, saved.stride, saved.offset)


def _again(m: _Made) -> Any:
    """The output ``m`` recorded, computed again once (and its input first, where that is recomputed too)."""
    import torch

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
