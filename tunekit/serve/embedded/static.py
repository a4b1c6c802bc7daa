"""A static KV cache for the running batch, and CUDA graphs over its decode step.

The eager path (running.py) grows, pads and concatenates a dynamic cache, so every step has new shapes
and is replayed by Python kernel by kernel. Here the cache is preallocated as ``[rows, heads, length, dim]``
per layer with ``rows`` a bucket (1, 2, 4, ..., 32) and ``length`` a multiple of 256: the decode step has
static shapes, so one step per (rows, length, LoRA mode) is captured once as a CUDA graph and replayed.

Layout: every row's newest token sits in column ``t - 1`` (rows are right-aligned at the shared write
column ``t``, as in running.py); ``bias`` [rows, 1, 1, length] is the additive attention mask (0 on a
row's own columns, -inf elsewhere), ``pos`` each row's RoPE position. A finished row frees its cache row;
a joining group is prefilled eagerly (dynamic cache) and its KV copied into free rows at the columns
ending at ``t`` (all rows shifted right first if the joiners are wider). Outgrowing the bucket or the
length re-allocates and copies (rare: lengths double).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .attention import NAME as GQA_DECODE

if TYPE_CHECKING:
    from .running import Running

BUCKETS = (1, 2, 4, 8, 16, 32)
_CHUNK = 256


def bucket(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


def unsupported(model: Any) -> str | None:
    """Why ``model`` cannot decode through the static cache (None when it can)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention layers"
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager", GQA_DECODE):
        return f"attention implementation {model.config._attn_implementation!r}"
    return None


class StaticRunning:
    """Rows decoding together in a preallocated cache; same interface to the engine as running.Running."""

    def __init__(self, model: Any, rows_cap: int, length: int, like: torch.Tensor) -> None:
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        n_heads = like.shape[1]
        dev, dt = like.device, like.dtype
        for layer in self.cache.layers:
            layer.keys = torch.zeros(rows_cap, n_heads, length, like.shape[3], device=dev, dtype=dt)
            layer.values = torch.zeros_like(layer.keys)
            layer.cumulative_length = torch.zeros((), dtype=torch.long, device=dev)
            layer.max_batch_size, layer.batch_size, layer.num_heads = rows_cap, rows_cap, n_heads
            layer.k_head_dim = layer.v_head_dim = like.shape[3]
            layer.device, layer.is_initialized = dev, True
        self.cap, self.length, self.t = rows_cap, length, 0
        self._lengths = -1  # the write column every layer's cumulative_length holds (-1: unknown)
        self.rows: list = []
        self.slots: list[int] = []
        self.where: list[int] = []  # cache row of each active row
        self.ids = torch.zeros(rows_cap, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows_cap, 1, dtype=torch.long, device=dev)
        self.bias = torch.full((rows_cap, 1, 1, length), torch.finfo(dt).min, dtype=dt, device=dev)
        self.graphs: dict[Any, Any] = {}  # (mode) -> (CUDAGraph, logits) for this bucket and length
        self.graph_key: Any = None  # set by the engine: None = eager forward, else the LoRA mode of the step
        self.before_capture: Any = lambda: None  # set by the engine: LoraSlots.regather

    # -- what the engine calls ---------------------------------------------------------------------------
    def batch_slots(self) -> list[int]:
        """The slot of every cache row (0 = base for free rows), for LoraSlots.set_rows."""
        out = [0] * self.cap
        for w, s in zip(self.where, self.slots):
            out[w] = s
        return out

    def forward(self, cache_kw: str, use_graphs: bool) -> torch.Tensor:
        """Logits [active rows, vocab] of one decode step over every row of the bucket."""
        if self._lengths != self.t:  # each layer's write column; a step adds 1 itself, so only after a re-layout
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.t)
        self.bias[:, :, :, self.t] = 0  # each row attends to the token it writes now (free rows too: no NaN)
        if use_graphs and self.graph_key is not None:
            logits = self._replay(cache_kw)
        else:
            logits = self._eager(cache_kw)
        self.t += 1
        self._lengths = self.t  # every layer's cache update added this step's token
        return logits[:len(self.where)] if self._prefix() else logits[self.where]

    def _prefix(self) -> bool:
        """Whether the active rows are cache rows 0..n-1 in order (slices then do without an index tensor)."""
        return all(i == w for i, w in enumerate(self.where))

    def advance(self, tokens: torch.Tensor) -> None:
        """Next inputs of the active rows (``tokens`` [active]); grow the length before it runs out."""
        if self._prefix():
            n = len(self.where)
            self.ids[:n, 0].copy_(tokens)
            self.pos[:n] += 1
        else:
            idx = torch.tensor(self.where, device=self.ids.device)
            self.ids[idx, 0] = tokens.to(self.ids.device)
            self.pos[idx] += 1
        if self.t >= self.length:  # drop the columns no row uses any more, double the length if still short
            used = (self.bias[self.where, 0, 0, :self.t] == 0).any(0).nonzero()
            cut = int(used[0]) if len(used) else self.t
            length = self.length if self.t - cut < self.length * 3 // 4 else self.length * 2
            self._relayout(self.cap, length, -cut)

    def keep(self, keep: list[int]) -> None:
        """Keep active rows ``keep``; the others' cache rows become free (masked, base slot)."""
        kept = set(keep)
        gone = [w for i, w in enumerate(self.where) if i not in kept]
        if gone:
            self.bias[gone] = torch.finfo(self.bias.dtype).min
        self.rows = [self.rows[i] for i in keep]
        self.slots = [self.slots[i] for i in keep]
        self.where = [self.where[i] for i in keep]

    def join(self, other: "Running") -> None:
        """Copy the prefilled rows of ``other`` (a dynamic cache, left-padded) into free cache rows."""
        n = len(self.rows) + len(other.rows)
        width = other.mask.shape[1] - 1  # other has been advanced: its last mask column is the next token's
        if not self.rows:  # an empty (reused) cache: no columns to keep
            self.t = 0
            self.bias.fill_(torch.finfo(self.bias.dtype).min)
        need = max(self.t, width) + 1
        length = self.length
        while length < need:
            length *= 2
        if n > self.cap or length != self.length or (width > self.t and self.rows):
            self._relayout(max(self.cap, bucket(n)), length, max(0, width - self.t))
        self.t = max(self.t, width)
        free = sorted(set(range(self.cap)) - set(self.where))[:len(other.rows)]
        idx = torch.tensor(free, device=self.ids.device)
        lo = self.t - width
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys[idx, :, lo:self.t] = theirs.keys
            mine.values[idx, :, lo:self.t] = theirs.values
        bias = torch.full((len(free), self.length), torch.finfo(self.bias.dtype).min, dtype=self.bias.dtype,
                          device=self.bias.device)
        bias[:, lo:self.t] = bias[:, lo:self.t].masked_fill(other.mask[:, :-1] != 0, 0)
        self.bias[idx, 0, 0] = bias
        self.ids[idx] = other.ids
        self.pos[idx] = other.pos
        self.rows += other.rows
        self.slots += other.slots
        self.where += free

    # -- internals ---------------------------------------------------------------------------------------
    def _relayout(self, cap: int, length: int, shift: int) -> None:
        """Re-allocate as ``cap`` rows x ``length`` columns, moving the used columns by ``shift`` (< 0: left)."""
        t, lo = self.t, max(0, -shift)  # columns [lo, t) move to [lo + shift, t + shift)
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(cap, old.shape[1], length, old.shape[3])
                new[:self.cap, :, lo + shift:t + shift] = old[:, :, lo:t]
                setattr(layer, name, new)
            layer.max_batch_size = layer.batch_size = cap
            layer.max_cache_len = length
        if not isinstance(getattr(type(self.cache), "max_cache_len", None), property):
            self.cache.max_cache_len = length  # newer transformers keep it on the cache too; older ones read the layers
        bias = self.bias.new_full((cap, 1, 1, length), torch.finfo(self.bias.dtype).min)
        bias[:self.cap, :, :, lo + shift:t + shift] = self.bias[:, :, :, lo:t]
        ids, pos = self.ids.new_zeros(cap, 1), self.pos.new_zeros(cap, 1)
        ids[:self.cap], pos[:self.cap] = self.ids, self.pos
        self.bias, self.ids, self.pos = bias, ids, pos
        self.cap, self.length, self.t = cap, length, t + shift
        self.graphs.clear()  # captured over the old buffers

    def _eager(self, cache_kw: str) -> torch.Tensor:
        out = self.model(input_ids=self.ids, attention_mask=self.bias, position_ids=self.pos, use_cache=True,
                         logits_to_keep=1, **{cache_kw: self.cache})
        return out.logits[:, -1, :]

    def _replay(self, cache_kw: str) -> torch.Tensor:
        entry = self.graphs.get(self.graph_key)
        if entry is None:
            # Warm up on a side stream (lazy inits, cuBLAS workspaces), then capture. Warm-up and capture
            # each write this step's column; it is written again by the replay below, so nothing is lost.
            self.before_capture()  # fresh LoRA gathers (fixed buffers) and no input held from an eager step
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    for layer in self.cache.layers:
                        layer.cumulative_length.fill_(self.t)
                    self._eager(cache_kw)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self.before_capture()
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.t)
            with torch.cuda.graph(graph):
                logits = self._eager(cache_kw)
            entry = self.graphs[self.graph_key] = (graph, logits)
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.t)
        graph, logits = entry
        graph.replay()
        return logits


def initial_length(width: int, params_max: int, max_model_len: int) -> int:
    """A first cache length: room for the prompt and a first stretch of tokens, in whole chunks."""
    need = width + max(1, min(params_max, _CHUNK)) + 1
    return min(-(-need // _CHUNK) * _CHUNK, max(max_model_len + 1, need))
