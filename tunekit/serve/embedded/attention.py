"""Decode attention over grouped KV heads without repeating K and V.

transformers' sdpa path passes SDPA no grouped-query flag when there is an attention mask (torch's fused kernels
take none with a mask), so it repeats K and V to every query head first (`repeat_kv`): at each decode step,
every layer writes and reads a copy of the whole cache n_rep times its size (Llama-3-8B: 4x; 16 rows x 2,048
columns: 0.5 GiB per layer per step, which the step then reads again). The server's decode always has a mask
(left-padded rows, the static cache's free columns).

A decode step has one query per row, so the n_rep query heads of one KV head can instead be that KV head's n_rep
query *rows*: q [rows, kv_heads * n_rep, 1, dim] viewed as [rows, kv_heads, n_rep, dim] attends to K/V
[rows, kv_heads, length, dim] as they are, the [rows, 1, 1, length] mask broadcasting over the n_rep rows. Same
arithmetic per (row, head); no copy. Prefill (several queries per row) goes to transformers' sdpa path as before.

Newer transformers do the same themselves (`sdpa_attention.pack_gqa`, in 5.24); this is used only where they do not
(5.17, the version the GPU machine has, still repeats K/V).
"""

from __future__ import annotations

from typing import Any

NAME = "tunekit_gqa_decode"


def _gqa_decode(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads or attention_mask is None or dropout or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # query head h = kv * n_rep + r -> [kv, r]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling)
    return out.reshape(rows, 1, heads, dim), None  # [rows, q_len=1, heads, dim], as sdpa_attention_forward returns


def use_gqa_decode(model: Any) -> bool:
    """Switch ``model`` from transformers' sdpa attention to the grouped decode above (True when it did)."""
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa" or hasattr(sdpa_attention, "pack_gqa"):
        return False  # another attention, or transformers' sdpa path groups the heads of a decode step itself
    AttentionInterface.register(NAME, _gqa_decode)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks are built as for sdpa
    model.set_attn_implementation(NAME)
    return True
