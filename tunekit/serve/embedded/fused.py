"""Fused kernels for the served base model: Liger's Triton RMSNorm, RoPE and SwiGLU (the training path's kernels).

A decode step of 16 rows is a few thousand small kernels: per layer, transformers' RMSNorm is ~7 elementwise
kernels (twice), RoPE ~10 and the MLP's activation 2. Even replayed from a CUDA graph each costs its launch gap
on the GPU; Liger runs each of the three as one kernel. The projections (and the LoRA slots around them) are
unchanged, so LoRA and DoRA rows decode as before. Liger replaces RoPE in the model's transformers module (for
every model of that type in the process), RMSNorm and SwiGLU on this model's modules only.
"""

from __future__ import annotations

import sys
from typing import Any

from ..._exceptions import ConfigError

KERNELS = ("auto", "liger", "off")


def apply_fused_kernels(model: Any, device: Any, asked: str) -> tuple[str, str | None]:
    """Apply what ``asked`` allows to ``model``; returns (what runs: "liger" | "off", why not, when not)."""
    from ...backends.local.speed import liger_support  # the training plan's own check: device, model type, install

    if asked not in KERNELS:
        raise ConfigError(f"kernels {asked!r} is not one of {', '.join(KERNELS)}", field="kernels")
    if asked == "off":
        # Liger patches RoPE in the model's module, for the whole process: say so if an earlier model did
        rope = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
        if getattr(rope, "__module__", "").startswith("liger_kernel"):
            return "off", "Liger's RoPE stays on: an earlier model in this process installed it for its model type"
        return "off", None
    ok, why = liger_support(model.config.to_dict(), device.type)
    if not ok:
        if asked == "liger":
            raise ConfigError(f"kernels='liger' cannot run here: {why}", field="kernels",
                              hint="use kernels='auto' (Liger where it can run) or 'off'")
        return "off", why
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger", None
