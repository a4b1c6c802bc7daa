"""Packed (padding-free) training attention per packed example, with PyTorch's variable-length flash attention.

Why: TRL's padding-free collator lays a packed micro-batch out as ONE row of T tokens whose position ids restart
at each example. transformers' sdpa path turns that into a block-diagonal causal [1, 1, T, T] mask, and SDPA's
masked kernel (memory-efficient or cuDNN) visits all T x T scores: at 4 x 2048 tokens about 4x the attention work
of the examples themselves, plus the mask and its bias (H200, 8B QLoRA: 1.99 s per packed step against 0.78 s for
as many unpacked tokens). `torch.nn.attention.varlen.varlen_attn` runs flash attention over each example's own
causal block from cumulative lengths (cu_seqlens), with no mask.

How: registered with transformers under NAME like serve/embedded/attention.py. The mask function builds no mask
where the attention function splits the row itself (one unpadded row, query length = key length, CUDA, a model
without sliding windows or soft-capping), else it is transformers' `sdpa_mask`. The attention function runs
varlen_attn on a packed row and transformers' `sdpa_attention_forward` on everything else, unchanged (padded
batches, single unpacked rows, generation). A packed row the kernel cannot take (fp32, dropout, head dim > 256)
gets the block-diagonal mask built here, so the result never depends on which path ran.

Segments follow transformers' own rule (`masking_utils.find_packed_sequence_indices`: a new example wherever the
position id is not the previous one + 1; for TRL's ids, where they restart at 0), so the varlen path attends
exactly where transformers' mask would let it. They cost one device-to-host sync per forward: computed once and
kept for the other layers and the checkpoint recompute (`segments_of`).
"""

from __future__ import annotations

import functools
from typing import Any

NAME = "tunekit_varlen"
SPEEDUP = "varlen_attention"  # the name in speed.OPTIMISATIONS and the outcome's speed.applied
DEVICE_TYPES = ("cuda",)  # flash attention kernels (tests add "cpu" with a reference kernel)
DTYPES = ("torch.bfloat16", "torch.float16")  # what the flash kernels take
MAX_HEAD_DIM = 256  # flash attention's largest head dimension
# model types whose attention was checked to take this path (Llama's module layout, as speed.LIGER_MODEL_TYPES)
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@functools.cache
def kernel() -> tuple[Any, frozenset[str]] | None:
    """(varlen_attn, its parameter names), or None where this torch has none. The names pick the call: causal is
    ``window_size=(-1, 0)`` in torch 2.11-2.13 (an ``is_causal=`` flag where a version has one); grouped K/V
    heads go in as they are where ``enable_gqa`` exists (2.13), else repeated to every query head (2.11)."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def decide(device_type: str, packing: bool, model_type: str, off: frozenset[str] = frozenset()) -> tuple[bool, str]:
    """Whether a run takes the varlen path, and why (not). Only packed runs have anything to split."""
    if not packing:
        return False, "rows are not packed"
    if device_type not in DEVICE_TYPES:
        return False, "CUDA only (flash attention kernels): packed rows keep sdpa's block-diagonal mask"
    if model_type not in MODEL_TYPES:
        return False, f"model type {model_type!r} not covered: packed rows keep sdpa's block-diagonal mask"
    if SPEEDUP in off:
        return False, "disabled by provider_options.local.speedups: packed rows keep sdpa's block-diagonal mask"
    if kernel() is None:
        import torch

        return False, (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn: packed rows keep "
                       "sdpa's block-diagonal mask")
    return True, ("packed rows: flash attention over each packed example (torch varlen_attn), instead of sdpa over "
                  "the whole packed sequence under a block-diagonal mask")


def packed_attention(device_type: str, model_type: str, off: frozenset[str] = frozenset()) -> str:
    """What a packed row's attention costs in memory (attention.py's kind): a varlen kind where `decide` takes this
    path ("varlen_gqa" where the kernel takes grouped K/V heads, else "varlen": repeated), else sdpa's "packed"
    block-diagonal mask. The plan's estimate and packing='auto' use it."""
    if not decide(device_type, True, model_type, off)[0]:
        return "packed"
    return "varlen_gqa" if "enable_gqa" in kernel()[1] else "varlen"


def use(model: Any) -> bool:
    """Switch ``model`` (or the model under a PEFT wrapper) from sdpa to this attention; True when it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False  # eager or flash-attention models: theirs is kept
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    base.set_attn_implementation(NAME)
    return True


# ------------------------------------------------------------------------------------------------ segments

def segments(position_ids: Any) -> tuple[Any, int] | None:
    """(cu_seqlens: int32 [n + 1] on the ids' device, longest example) of one row of n >= 2 packed examples;
    None for anything else (several rows, one example)."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    p = position_ids[0]
    starts = torch.ones_like(p, dtype=torch.bool)
    starts[1:] = p[1:] != p[:-1] + 1  # transformers' rule (find_packed_sequence_indices)
    idx = starts.nonzero().flatten()  # the one sync
    if idx.numel() < 2:
        return None
    cu = torch.cat([idx, idx.new_tensor([p.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


# the last position ids seen (kept alive, so that no later tensor can reuse their id) and their segments: every
# layer of a forward, and the checkpoint recompute of each, get the same tensor
_last: list[Any] = [None, -1, None]


def segments_of(position_ids: Any) -> tuple[Any, int] | None:
    """`segments`, computed once per position-ids tensor (and its in-place version)."""
    if position_ids is None:
        return None
    if _last[0] is position_ids and _last[1] == position_ids._version:
        return _last[2]
    _last[:] = [position_ids, position_ids._version, segments(position_ids)]
    return _last[2]


# ------------------------------------------------------------------------------------------------ transformers hooks

def _splittable_config(config: Any) -> bool:
    """No sliding window, logit soft-capping or attention dropout: what the varlen call below does not do."""
    c = getattr(config, "get_text_config", lambda: config)()
    return not (getattr(c, "sliding_window", None) or getattr(c, "attn_logit_softcapping", None)
                or getattr(c, "attention_dropout", 0.0) or "sliding_attention" in (getattr(c, "layer_types", None) or ()))


def mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' sdpa_mask, except that one unpadded row gets none: the attention function splits a packed
    row itself, and a single example is causal (what sdpa_mask returns None for too)."""
    from transformers.masking_utils import sdpa_mask

    kw = kwargs
    device = kw.get("device")
    if (not args and kw.get("batch_size") == 1 and kw.get("attention_mask") is None
            and kw.get("q_length") == kw.get("kv_length") and not kw.get("use_vmap")
            and isinstance(kw.get("q_offset", 0), int) and kw.get("q_offset", 0) == 0 and kw.get("kv_offset", 0) == 0
            and getattr(device, "type", device) in DEVICE_TYPES and _splittable_config(kw.get("config"))
            and kernel() is not None):
        return None
    return sdpa_mask(*args, **kwargs)


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """varlen_attn over each example of a packed row; transformers' sdpa_attention_forward for anything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seg, pos = None, kwargs.get("position_ids")
    if (attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1
            and pos is not None and pos.shape[-1] == query.shape[2]):
        seg = segments_of(pos)
    if seg is not None:
        if _varlen_ok(query, key, value, dropout, kwargs):
            return _varlen(query, key, value, seg, scaling), None
        # a packed row the kernel cannot take: the block-diagonal mask transformers would have built
        attention_mask = _block_causal_mask(seg[0], query.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _varlen_ok(query: Any, key: Any, value: Any, dropout: float, kwargs: dict[str, Any]) -> bool:
    return (kernel() is not None and query.device.type in DEVICE_TYPES and str(query.dtype) in DTYPES
            and query.dtype == key.dtype == value.dtype and not dropout
            and query.shape[-1] == key.shape[-1] == value.shape[-1] <= MAX_HEAD_DIM
            and query.shape[1] % key.shape[1] == 0
            and not kwargs.get("sliding_window") and not kwargs.get("softcap") and not kwargs.get("output_attentions"))


def _varlen(query: Any, key: Any, value: Any, seg: tuple[Any, int], scaling: float | None) -> Any:
    """[1, H, T, D] q and [1, Hkv, T, D] k/v -> [1, T, H, D], as sdpa_attention_forward returns."""
    fn, params = kernel()
    cu, longest = seg
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, heads, D]
    kw: dict[str, Any] = {"scale": scaling}
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif rep > 1:  # kv head j serves query heads j * rep .. j * rep + rep - 1, as transformers' repeat_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # varlen_attn's causal
    out = fn(q, k, v, cu, cu, longest, longest, **kw)
    return out.unsqueeze(0)


def _block_causal_mask(cu: Any, length: int) -> Any:
    """[1, 1, T, T] bool: causal within each example of cu_seqlens, nothing across."""
    import torch

    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long(),
                                  output_size=length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu.device).tril()
    return ((seg[:, None] == seg[None, :]) & causal)[None, None]
