"""The running batch of continuous batching: rows decoding together, and how new rows join it.

Rows are left-padded: every row's newest token is in the last column, and the attention mask marks each
row's own columns (position ids come from the mask, so padding moves no row's RoPE positions). A group of
new rows is prefilled on its own, then joins: the shorter of the two KV caches gets empty (masked)
columns on the left and the caches are concatenated along the batch. When rows leave, columns that no
remaining row uses are cut off the left, so the width follows the longest row still decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .requests import GenRequest


def joinable(cache: Any) -> bool:
    """Whether rows can join ``cache`` mid-decode: every layer a plain growing (full-attention) KV layer.

    A sliding-window or static layer keeps its own positions; those batches decode to their end instead.
    """
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "is_initialized", False)
                                for layer in layers)


def _pad_left(cache: Any, n: int) -> None:
    if n <= 0:
        return
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layer.keys = torch.cat([k.new_zeros(*k.shape[:2], n, k.shape[3]), k], dim=2)
        layer.values = torch.cat([v.new_zeros(*v.shape[:2], n, v.shape[3]), v], dim=2)


@dataclass
class Running:
    """Rows decoding together, ready for the next forward (``ids`` is each row's next input token)."""

    rows: list["GenRequest"]
    slots: list[int]
    cache: Any
    ids: torch.Tensor  # [rows, 1]
    mask: torch.Tensor  # [rows, cache length + 1]
    pos: torch.Tensor  # [rows, 1]

    def keep(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (indices), then drop the left columns no kept row uses."""
        if not keep:  # every row finished: nothing left to select
            self.rows, self.slots, self.cache = [], [], None
            return
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, dtype=torch.long, device=self.ids.device)
            self.cache.batch_select_indices(idx)
            self.ids, self.mask, self.pos = self.ids[idx], self.mask[idx], self.pos[idx]
            self.rows = [self.rows[i] for i in keep]
            self.slots = [self.slots[i] for i in keep]
            used = self.mask.any(0).nonzero()
            cut = int(used[0]) if len(used) else 0
            if cut and joinable(self.cache):
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
                self.mask = self.mask[:, cut:]

    def join(self, other: "Running") -> None:
        """Append ``other``'s rows (both caches must be :func:`joinable`)."""
        width, o_width = self.mask.shape[1], other.mask.shape[1]
        if width < o_width:
            _pad_left(self.cache, o_width - width)
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), o_width - width), self.mask], dim=1)
        elif o_width < width:
            _pad_left(other.cache, width - o_width)
            other.mask = torch.cat([other.mask.new_zeros(len(other.rows), width - o_width), other.mask], dim=1)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.rows += other.rows
        self.slots += other.slots
        self.ids = torch.cat([self.ids, other.ids])
        self.mask = torch.cat([self.mask, other.mask])
        self.pos = torch.cat([self.pos, other.pos])
