"""What tunekit knows about each adapter variant, one small strategy object per choice.

As PEFT's ``lora/variants.py`` keeps one class per LoRA variant with the hooks its layers call, a spec's adapter
here picks one strategy of each kind (`of`), and the rest of the local backend asks them instead of testing
``use_dora``/``init``/``use_rslora``/``loraplus_lr_ratio`` itself:

  form       LORA | DORA          PEFT kwargs, trainable parameters per adapted linear (memory.py), the fused
                                  forward that covers it (speed.py), modules it cannot adapt, plan notes
  init       INITS[spec name]     PEFT's init_lora_weights, whether it rewrites the base into a residual
                                  (PiSSA/OLoRA: saved converted to plain LoRA), what it refuses
  scaling    STANDARD | RSLORA    alpha / r or alpha / sqrt(r); the alpha that keeps the scale when r changes
  optimizer  PLAIN | LoraPlus     the optimizer's name and, for LoRA+, the optimizer with its two groups

Pure: nothing heavy is imported at module level (the plan uses it without torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..._exceptions import ConfigError

# ------------------------------------------------------------------------------------------------ form


@dataclass(frozen=True)
class Form:
    """Plain LoRA: W + s B A, r (in + out) trainable parameters per adapted linear."""

    def peft_kwargs(self) -> dict[str, Any]:
        return {"use_dora": False}

    def trainable_params(self, r: int, in_features: int, out_features: int) -> int:
        return r * (in_features + out_features)

    def speedups(self) -> dict[str, tuple[bool, str]]:
        """The form's own speed-ups: name -> (applies, why)."""
        return {"fast_dora": (False, "no DoRA")}

    def notes(self, adapter: Any) -> list[str]:
        return []

    def check(self, adapter: Any) -> None:
        pass


@dataclass(frozen=True)
class Dora(Form):
    """DoRA: (m / ||W + s B A||) (W + s B A); the magnitude m adds out_features parameters per linear."""

    def peft_kwargs(self) -> dict[str, Any]:
        return {"use_dora": True}

    def trainable_params(self, r: int, in_features: int, out_features: int) -> int:
        return super().trainable_params(r, in_features, out_features) + out_features

    def speedups(self) -> dict[str, tuple[bool, str]]:
        return {"fast_dora": (True, "cached DoRA weight norm")}

    def notes(self, adapter: Any) -> list[str]:
        if adapter.dropout <= 0:
            return []
        return [f"DoRA with adapter.dropout={adapter.dropout}: PEFT's DoRA applies the dropout to the base term too, "
                "so every adapted layer runs its base matmul twice; adapter.dropout=0 takes the fused DoRA path"]

    def check(self, adapter: Any) -> None:
        if adapter.target_modules == "all-linear":
            return
        bad = [m for m in adapter.target_modules if m in ("embed_tokens", "lm_head", "wte")]
        if bad:
            raise ConfigError(
                f"DoRA cannot adapt embedding/output modules {bad}",
                field="adapter.target_modules",
                hint="drop them from adapter.target_modules or set adapter.use_dora=false",
            )


LORA, DORA = Form(), Dora()


def form_of(use_dora: bool) -> Form:
    return DORA if use_dora else LORA


# ------------------------------------------------------------------------------------------------ init


@dataclass(frozen=True)
class Init:
    """An adapter initialisation: ``peft`` is PEFT's init_lora_weights value."""

    name: str
    peft: Any
    mutates_base: bool = False  # rewrites the base into a residual: saved converted to plain LoRA
    needs_full_precision: bool = False  # an SVD of the unquantized weight (PEFT raises on 4-bit weights)

    def peft_kwargs(self) -> dict[str, Any]:
        return {"init_lora_weights": self.peft}

    def check(self, spec: Any, quantized: bool | None, why_quantized: str = "") -> None:
        if self.needs_full_precision and quantized:
            # the PEFT recipe is: init in bf16, save the residual model, re-quantize it
            raise ConfigError(
                f"adapter.init={self.name!r} needs a full-precision base, but quantization resolved to nf4 "
                f"({why_quantized})",
                field="adapter.init",
                hint="set quantization='none', or use adapter.init='olora' (supports 4-bit) or 'default' with nf4",
            )
        if self.mutates_base and spec.method == "dpo":
            # DPO's reference model is the base with the adapter disabled, here the residual, not the original
            raise ConfigError(
                f"adapter.init={self.name!r} cannot be used with method='dpo': the reference model would be the "
                "residual base",
                field="adapter.init",
                hint="use adapter.init='default' or 'gaussian' for DPO",
            )


INITS: dict[str, Init] = {i.name: i for i in (
    Init("default", True),
    Init("gaussian", "gaussian"),
    Init("pissa", "pissa", mutates_base=True, needs_full_precision=True),
    # randomized SVD, 16 subspace iterations (PEFT's "fast" PiSSA)
    Init("pissa_fast", "pissa_niter_16", mutates_base=True, needs_full_precision=True),
    Init("olora", "olora", mutates_base=True),  # re-quantizes its residual itself: fine on 4-bit
)}


# ------------------------------------------------------------------------------------------------ scaling


@dataclass(frozen=True)
class Scaling:
    """PEFT's default scale alpha / r."""

    rslora: bool = False

    def peft_kwargs(self) -> dict[str, Any]:
        return {"use_rslora": self.rslora}

    def alpha_for_rank(self, alpha: float, factor: float) -> float:
        """The alpha that keeps the scale when r is multiplied by ``factor``."""
        return alpha * (math.sqrt(factor) if self.rslora else factor)


STANDARD, RSLORA = Scaling(), Scaling(rslora=True)  # RSLORA: alpha / sqrt(r) (rank-stabilized LoRA)


# ------------------------------------------------------------------------------------------------ optimizer


@dataclass(frozen=True)
class Optimizer:
    """One learning rate for all adapter parameters: the Trainer builds the optimizer from its name."""

    def name(self, base: str, quantized: bool) -> str:
        return base

    def build(self, model: Any, hp: Any, planned: str, on_gpu: bool) -> Any:
        return None


@dataclass(frozen=True)
class LoraPlus(Optimizer):
    """LoRA+: B learns ``ratio`` times faster than A (PEFT's create_loraplus_optimizer builds the groups) with
    the class the Trainer would use: torch's AdamW, or bitsandbytes' 8-bit AdamW where the run was planned with
    it (a run recorded before QLoRA moved to fp32 AdamW state, resumed: resolve.optimizer_name)."""

    ratio: float = 16.0

    def name(self, base: str, quantized: bool) -> str:
        return "loraplus+" + (base if quantized and "8bit" in base else "adamw_torch")

    def build(self, model: Any, hp: Any, planned: str, on_gpu: bool) -> Any:
        from peft.optimizers import create_loraplus_optimizer

        if "8bit" in planned:
            import bitsandbytes as bnb

            opt_cls = bnb.optim.PagedAdamW8bit if on_gpu else bnb.optim.AdamW8bit
        else:
            import torch

            opt_cls = torch.optim.AdamW
        return create_loraplus_optimizer(model=model, optimizer_cls=opt_cls, lr=hp.learning_rate,
                                         loraplus_lr_ratio=self.ratio, weight_decay=hp.weight_decay)


PLAIN = Optimizer()


# ------------------------------------------------------------------------------------------------ the adapter


@dataclass(frozen=True)
class Variants:
    """The strategies of one spec's adapter."""

    form: Form
    init: Init
    scaling: Scaling
    optimizer: Optimizer

    def peft_kwargs(self) -> dict[str, Any]:
        return {**self.form.peft_kwargs(), **self.scaling.peft_kwargs(), **self.init.peft_kwargs()}

    def check(self, spec: Any, quantized: bool | None = None, why_quantized: str = "") -> None:
        """Refuse combinations PEFT/TRL cannot train correctly, before any model is loaded."""
        self.init.check(spec, quantized, why_quantized)
        self.form.check(spec.adapter)

    def saved_config(self, lora_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The LoraConfig of the adapter as saved: a residual init is converted to plain LoRA, which PEFT does
        by doubling r (and alpha so that the scale stays)."""
        if not self.init.mutates_base:
            return dict(lora_kwargs)
        return {**lora_kwargs, "r": 2 * lora_kwargs["r"],
                "lora_alpha": self.scaling.alpha_for_rank(lora_kwargs["lora_alpha"], 2),
                "init_lora_weights": True, "converted_from": self.init.name}


def of(adapter: Any) -> Variants:
    """The strategies a spec's ``adapter`` section picks."""
    return Variants(
        form=form_of(adapter.use_dora),
        init=INITS[adapter.init],
        scaling=RSLORA if adapter.use_rslora else STANDARD,
        optimizer=LoraPlus(adapter.loraplus_lr_ratio) if adapter.loraplus_lr_ratio else PLAIN,
    )
