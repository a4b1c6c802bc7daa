"""Which Hugging Face architectures llama.cpp runs, and how their tensors and settings are named in GGUF.

Names come from gguf-py's tensor mapping (the table llama.cpp's converters use). Llama-family
checkpoints store q/k rows in Hugging Face's half-split rotary order; llama.cpp expects the rows of
each head interleaved, so q_proj/k_proj (and a LoRA B that writes into them) are permuted like
llama.cpp's ``convert_hf_to_gguf.py`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._exceptions import ConfigError


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # general.architecture
    permute_qk: bool  # rows of q/k re-ordered from half-split to interleaved rotary pairs
    bpe_pre: str  # tokenizer.ggml.pre for a byte-level BPE tokenizer


# Hugging Face architectures of the models tunekit's catalog lists (Llama 3.x, Qwen2.5, Mistral).
ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("llama", True, "llama-bpe"),
    "MistralForCausalLM": Arch("llama", True, "llama-bpe"),
    "Qwen2ForCausalLM": Arch("qwen2", False, "qwen2"),
}


def arch_of(config: dict[str, Any]) -> Arch:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise ConfigError(
        f"architecture {names or config.get('model_type')!r} is not one tunekit exports to GGUF "
        f"(supported: {', '.join(ARCHS)})", field="base_model",
        hint="merge with `tunekit merge` and convert the merged directory with llama.cpp's convert_hf_to_gguf.py")


def name_map(arch: Arch, n_blocks: int):
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    return gguf.get_tensor_name_map(model_arch, n_blocks)


def gguf_name(tmap: Any, hf_name: str) -> str | None:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (None when unmapped)."""
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def head_counts(config: dict[str, Any]) -> tuple[int, int]:
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)


def permute_rows(rows: Any, n_head: int) -> Any:
    """Half-split rotary rows of each head -> interleaved pairs (llama.cpp's order); works on torch and numpy."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling block, or None for plain RoPE (transformers 5 names it rope_parameters)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind in (None, "default") else scaling


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> list[float]:
    """Per-frequency factors of Llama 3.1's rope scaling, the ``rope_freqs.weight`` llama.cpp reads."""
    s = rope_scaling(config) or {}
    factor = float(s.get("factor", 8.0))
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    import torch  # float32 frequencies, as the model computes them (and llama.cpp's converter)

    freqs = 1.0 / (rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def check_rope(config: dict[str, Any]) -> str | None:
    """'llama3' when the model needs rope factors; a ConfigError for scalings llama.cpp is not told about here."""
    scaling = rope_scaling(config)
    if scaling is None:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        return "llama3"
    raise ConfigError(f"rope scaling {kind!r} is not exported by tunekit", field="base_model",
                      hint="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
