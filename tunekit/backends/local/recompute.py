"""Normed hidden states recomputed in backward instead of kept (speed.py's ``recompute_norms``).

A decoder layer that is not checkpointed keeps, for its backward, the outputs of its two RMSNorms: the input of
the q/k/v projections and of the MLP's gate/up projections (their adapters' dL/dA needs it; the base weights are
frozen). Each is norm(x) of a tensor the norm keeps anyway (its input, for its own backward), and computing it is
one pass over [tokens, hidden]. So while such a layer runs forward, saved-tensor hooks
(torch.autograd.graph.saved_tensors_hooks, the mechanism of torch's checkpointing) store a norm output that an op
saves as a reference to the norm and its input, and backward computes it again with the same module, under the
same autocast state: the same kernel on the same input, so the same values. Two [tokens, hidden] tensors per layer
less (8B: 2 x 4,096 of the 55,408 elements per token a fused 4-bit layer keeps, memory._fused_layer_elems).

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
    """One norm output of the running forward: how to compute it again (``y`` only while the forward runs)."""

    norm: Any
    x: Any
    autocast: tuple
    layout: tuple  # (size, stride, storage offset) of the output: the recomputed one must have the same
    y: Any = None  # the output's root tensor (views share it)
    again: Any = None  # the recomputed output, shared by every saved view of it


@dataclass
class _Saved:
    made: _Made
    size: tuple
    stride: tuple
    offset: int


@dataclass
class _Layer:
    """One hooked layer: whether its forward is recording now, and the norm outputs it recorded."""

    active: bool = False
    made: list = field(default_factory=list)


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


def _record(state: _Layer, norm: Any, args: tuple, out: Any) -> None:
    import torch

    if not state.active:  # no grad, checkpointed, or the norm called outside its layer's forward
        return
    dev = out.device.type
    state.made.append(_Made(norm, args[0], (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)),
                            _layout(out), _root(out)))


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
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, state.made), _unpack):
            return original(*args, **kwargs)
    finally:
        state.active = False
        for m in state.made:
            m.y = None  # the hooks keep the recipe, not the output
        state.made.clear()


def _pack(made: list, t: Any) -> Any:
    root = _root(t)
    for m in made:
        if m.y is not None and root is m.y:
            return _Saved(m, *_layout(t))
    return t


def _unpack(saved: Any) -> Any:
    import torch

    if not isinstance(saved, _Saved):
        return saved
    m = saved.made
    if m.again is None:
        dev, enabled, dtype = m.autocast
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            m.again = m.norm(m.x)
        if _layout(m.again) != m.layout:
            raise RuntimeError(f"the recomputed norm output is laid out as {_layout(m.again)}, the forward's as "
                               f"{m.layout}; provider_options.local.speedups=['-recompute_norms'] keeps it instead")
    return m.again.as_strided(saved.size, saved.stride, saved.offset)
