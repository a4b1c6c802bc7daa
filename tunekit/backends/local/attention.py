"""What attention adds to a training step's memory beyond memory.py's per-layer terms (pure arithmetic, no torch).

memory.py's layer terms assume SDPA's flash kernel with no mask: it keeps only q, k, v and its output. Two things
cost more, and both grow with the square of the sequence: the [rows, 1, S, S] boolean mask transformers' sdpa
path builds for padded or packed rows (and what SDPA makes of it), and the S x S scores of a kernel that
materialises them (SDPA's math kernel). tests/test_local_longctx.py checks the mask against the tensors
transformers really builds. Packed rows through varlen.py's flash attention (kinds VARLEN) build no mask; where
the kernel takes no grouped K/V heads ("varlen", torch 2.11) it is given K and V repeated to every query head, and
keeps those copies for backward.
"""

from __future__ import annotations

from typing import Any

# SDPA's memory-efficient kernel reads its additive bias in blocks of this many keys: torch pads the bias's last
# dimension up to a multiple of it (preprocess_mask), so the bias it keeps is that wide
SDPA_BIAS_ALIGN = 16
# packed rows through varlen.py: "varlen" repeats K/V for the kernel, "varlen_gqa" passes the grouped heads
VARLEN = ("varlen", "varlen_gqa")
KINDS = ("none", "padded", "packed", *VARLEN)


def attention_mask_shape(micro_batch: int, max_length: int, kind: str, method: str = "sft") -> tuple[int, int]:
    """(rows, S) of the [rows, 1, S, S] boolean mask transformers' sdpa path builds, (0, 0) when it builds none.
    Padded: one row per example (DPO: chosen + rejected), and no mask for a single row (nothing to pad). Packed:
    TRL's padding-free collator lays the micro-batch out as one row of micro_batch x max_length tokens, whose
    restarting position ids give a block-diagonal mask over all of them."""
    rows = micro_batch * (2 if method == "dpo" else 1)
    if kind == "packed":
        return 1, rows * max_length
    if kind == "padded" and rows > 1:
        return rows, max_length
    if kind not in KINDS:
        raise ValueError(f"attention_mask={kind!r}: one of {', '.join(KINDS)}")
    return 0, 0


def attention_terms(d: dict[str, int], rows: int, length: int, kind: str, scores: bool, *, cdt: int,
                     layer_bytes: float, score_bytes: int) -> dict[str, Any]:
    """Bytes of attention beyond memory.py's layer terms, for ``rows`` rows of ``length`` tokens (DPO's already
    doubled) and a mask of ``kind`` (KINDS); ``scores``: the kernel materialises them.
    Conservative where torch's sources leave a choice:

      mask       rows x S x S bool, built once per forward, held by every checkpointed layer for its recompute
      saved      per layer, kept for backward: SDPA turns the bool mask into an additive bias in the compute
                 dtype (convert_boolean_attn_mask; under the Trainer's autocast, bf16), padded to SDPA_BIAS_ALIGN
                 keys, which the memory-efficient kernel saves; transformers repeats K and V to every query head
                 when a mask is passed (no GQA path with a mask), and SDPA saves those copies. Materialised scores
                 (math kernel): the softmax probabilities, rows x heads x S x S in q's dtype
      transient  while one layer's attention runs: the bool `logical_not` of the mask the bias is made from;
                 with scores, two more score tensors (forward: the raw scores beside the softmax output and the
                 result of _safe_softmax's where(); backward: the gradients of the probabilities and of the
                 scores) and _safe_softmax's bool test of -inf (one byte per score), plus is_causal's [S, S] mask
    """
    r, s = attention_mask_shape(rows, length, kind)
    out: dict[str, Any] = {"kind": kind if r or kind in VARLEN else "none", "mask": 0, "saved": 0, "transient": 0}
    if kind == "varlen":  # K/V repeated to every query head for the kernel, saved for its backward
        out["saved"] = rows * length * 2 * (d["heads"] - d["kv_heads"]) * d["head_dim"] * layer_bytes
    if r:
        s_keys = -(-s // SDPA_BIAS_ALIGN) * SDPA_BIAS_ALIGN
        out["mask"] = r * s * s
        kv_copies = 2 * (d["heads"] - d["kv_heads"]) * d["head_dim"]
        out["saved"] = r * s * s_keys * cdt + r * s * kv_copies * layer_bytes
        out["transient"] = r * s * s
    if scores:
        rr, ss = (r, s) if r else (rows, length)
        n = rr * d["heads"] * ss * ss
        out["saved"] += n * score_bytes
        out["transient"] += 2 * n * score_bytes + n + (0 if r else ss * ss * (1 + score_bytes))
    return out
