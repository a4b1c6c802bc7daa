"""Long-context memory means applied to a loaded model (speed.py decides them, kernels.apply calls `apply`).

  offload    Gradient checkpointing keeps one tensor per checkpointed decoder layer: its input hidden state,
             saved by torch.utils.checkpoint for the recompute (at 128k tokens of an 8B model, 1 GiB each). Around
             the checkpointed call of the first N layers, saved-tensor hooks (torch.autograd.graph's, the mechanism
             of torch's own `save_on_cpu`) move that input to pinned host memory and bring it back when backward
             recomputes the layer. The hooks see only the checkpoint's input: every tensor saved inside the layer
             goes to the checkpoint's own, inner hooks (the innermost hooks win), so small tensors are never
             copied. Exact: the same values come back. The copies run on the compute stream (non-blocking, pinned),
             so one layer's transfer (~20 ms per GiB over PCIe 5) is serialised with its compute, not overlapped.
  tiled_mlp  The MLP is per token, so it runs over tiles of tokens (Arctic Long Sequence Training's TiledMLP): a
             custom autograd function keeps only the MLP's input, computes the output tile by tile without a
             graph, and in backward recomputes each tile with one and takes its gradients (input and adapter),
             so the [tokens, intermediate] activations exist for one tile at a time. Exact up to the summation
             order of the weight gradients over tokens (per tile, then across tiles); the RNG state of each tile
             is replayed, so LoRA dropout draws the same masks. Cost: the MLP's forward once more.

Both fall back cleanly: on CPU the offload would copy host memory to host memory, so the plan never turns it on
there (tests force it, to check the path); a tiled MLP on a sequence shorter than a tile runs untiled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass
class OffloadStats:
    """What the offload hooks moved (for tests and the run's record)."""

    tensors: int = 0
    bytes: int = 0
    restored: int = 0


def apply(base: Any, sp: Any) -> dict[str, Any]:
    """Offload the saved inputs of the first ``sp.offload_layers`` checkpointed layers; tile the MLPs when
    ``sp.mlp_tile_tokens``. Call after kernels.set_checkpointing (it reads which layers are checkpointed)."""
    done: dict[str, Any] = {}
    if sp.offload_layers:
        done["offloaded_layers"] = offload_checkpointed_inputs(base, sp.offload_layers)[0]
    if sp.mlp_tile_tokens:
        done["tiled_mlp_modules"] = tile_mlps(base, sp.mlp_tile_tokens)
    return done


# ------------------------------------------------------------------------------------------------ offload

def offload_hooks(stats: OffloadStats | None = None) -> Any:
    """Saved-tensor hooks that keep each saved tensor in (pinned, for a CUDA tensor) host memory until backward
    unpacks it onto its device again. Like torch.autograd.graph.save_on_cpu, but with non-blocking copies on
    the current stream (stream order keeps both sides safe: the source block is reused only by later work on
    that stream, and the pinned block only after its copy back) and counting what moved."""
    import torch

    stats = stats if stats is not None else OffloadStats()

    def pack(t: Any) -> Any:
        if t.numel() == 0:  # e.g. the checkpoint's empty placeholders on CUDA: nothing to move
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=t.is_cuda)
        host.copy_(t, non_blocking=t.is_cuda)
        stats.tensors += 1
        stats.bytes += t.numel() * t.element_size()
        return t.device, host

    def unpack(packed: Any) -> Any:
        if not isinstance(packed, tuple):
            return packed
        device, host = packed
        stats.restored += 1
        return host.to(device, non_blocking=host.is_pinned())

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _offloaded_checkpoint(checkpoint: Any, stats: OffloadStats, function: Any, *args: Any, **kwargs: Any) -> Any:
    with offload_hooks(stats):  # outside the checkpoint: its saved input (the hidden state) goes to the host
        return checkpoint(function, *args, **kwargs)


def offload_checkpointed_inputs(base: Any, layers: int) -> tuple[int, OffloadStats]:
    """Route the checkpoint of the first ``layers`` checkpointed decoder layers through `offload_hooks`.

    transformers checkpoints a GradientCheckpointingLayer by calling its ``_gradient_checkpointing_func`` (the
    torch checkpoint partial that gradient_checkpointing_enable set) with the hidden state as the positional
    argument (the rest are bound keyword arguments, kept by reference: position embeddings, masks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stats = OffloadStats()
    n = 0
    for m in base.modules():
        if n >= layers:
            break
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            func = m._gradient_checkpointing_func
            if getattr(func, "func", None) is _offloaded_checkpoint:  # already routed (apply called twice)
                func = func.args[0]
            m._gradient_checkpointing_func = functools.partial(_offloaded_checkpoint, func, stats)
            n += 1
    return n, stats


# ------------------------------------------------------------------------------------------------ tiled MLP

def tile_mlps(base: Any, tile_tokens: int) -> int:
    """Give every Llama-style MLP (gate/up/down projections: per token, no state) of the decoder the tiled
    forward; returns how many. Wraps the MLP's current forward (Liger's SwiGLU when applied)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for layer in base.modules():
        mlp = getattr(layer, "mlp", None) if isinstance(layer, GradientCheckpointingLayer) else None
        if mlp is None or not all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
            continue
        current = vars(mlp).get("forward")
        if getattr(current, "func", None) is _tiled_forward:
            continue
        mlp.forward = functools.partial(_tiled_forward, mlp, mlp.forward, tile_tokens)
        n += 1
    return n


def _tiled_forward(mlp: Any, original: Any, tile: int, x: Any) -> Any:
    import torch

    tokens = x.numel() // x.shape[-1]
    if tokens <= tile or not torch.is_grad_enabled():  # one tile, or no backward to save memory for
        return original(x)
    params = tuple(p for p in mlp.parameters() if p.requires_grad)
    return TiledMLP.apply(original, tile, _dropout_active(mlp), x, *params)


def _dropout_active(mlp: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in mlp.modules())


def _autocast_state(device_type: str) -> tuple[bool, Any]:
    import torch

    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _rng_state(device: Any) -> tuple[Any, Any]:
    import torch

    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _tiles(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


@functools.cache
def _function() -> Any:
    import torch

    class _TiledMLP(torch.autograd.Function):
        """y = mlp(x) over token tiles; saves only x, recomputes each tile in backward. The trainable parameters
        are inputs after x, so their gradients are outputs of backward (no side writes to .grad)."""

        @staticmethod
        def forward(ctx: Any, run: Any, tile: int, replay_rng: bool, x: Any, *params: Any) -> Any:
            flat = x.reshape(-1, x.shape[-1])
            # leaf parameters on ctx (not saved tensors): no reference cycle, and backward needs them as they are
            ctx.run, ctx.tile, ctx.params = run, tile, params
            ctx.autocast = _autocast_state(x.device.type)
            ctx.rng = []
            out = None
            with torch.no_grad():
                for a, b in _tiles(flat.shape[0], tile):
                    if replay_rng:
                        ctx.rng.append(_rng_state(x.device))
                    y = run(flat[a:b])
                    if out is None:
                        out = y.new_empty((flat.shape[0], y.shape[-1]))
                    out[a:b] = y
            ctx.save_for_backward(x)
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            (x,) = ctx.saved_tensors
            params = list(ctx.params)
            flat, g = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
            want_x = ctx.needs_input_grad[3]
            grad_x = torch.empty_like(flat) if want_x else None
            grads: list[Any] = [None] * len(params)
            enabled, dtype = ctx.autocast
            cuda = x.device.type == "cuda"
            for i, (a, b) in enumerate(_tiles(flat.shape[0], ctx.tile)):
                xt = flat[a:b].detach().requires_grad_(want_x)
                with torch.random.fork_rng(devices=[x.device] if cuda else [], enabled=bool(ctx.rng),
                                           device_type=x.device.type):
                    if ctx.rng:  # the tile's forward drew these dropout masks
                        torch.set_rng_state(ctx.rng[i][0])
                        if cuda:
                            torch.cuda.set_rng_state(ctx.rng[i][1], x.device)
                    with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                        y = ctx.run(xt)
                got = torch.autograd.grad(y, ([xt] if want_x else []) + params, g[a:b], allow_unused=True)
                if want_x:
                    grad_x[a:b], got = got[0], got[1:]
                for j, gj in enumerate(got):
                    if gj is not None:
                        grads[j] = gj if grads[j] is None else grads[j] + gj
            return (None, None, None, grad_x.view_as(x) if want_x else None, *grads)

    return _TiledMLP


class TiledMLP:
    """``TiledMLP.apply(run, tile, replay_rng, x, *trainable_params)``: ``run(x_tile)`` is the MLP's forward,
    ``trainable_params`` the parameters it uses that take gradients."""

    @staticmethod
    def apply(run: Any, tile: int, replay_rng: bool, x: Any, *params: Any) -> Any:
        return _function().apply(run, tile, replay_rng, x, *params)
