"""The adapter pool: served names, a host cache of packed adapters, and an LRU of device slots.

Three tiers, cheapest first: resident in a device slot (no work), packed in host memory (one copy
into a slot: the hot swap), on disk (read + pack, then the copy). Only the scheduler thread calls
:meth:`acquire`, between batches, so a slot is never rewritten under a running forward.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..._exceptions import ConfigError
from ...adapters.info import AdapterInfo, read_adapter
from ..adapters import refuse_unservable
from .lora_slots import EMPTY_LAYOUT, AdapterWeights, LoraSlots, SlotLayout, pack, read_adapter_weights

ENGINE_LABEL = "the embedded server"


@dataclass
class _Entry:
    info: AdapterInfo
    rank: int
    modules: tuple[tuple[str, int, int], ...]


class AdapterPool:
    def __init__(self, model: torch.nn.Module, *, max_loras: int, device: torch.device, dtype: torch.dtype,
                 max_cpu_loras: int | None = None, max_lora_rank: int | None = None) -> None:
        if max_loras < 1:
            raise ConfigError("max_loras must be at least 1", field="max_loras")
        self.slots = LoraSlots(model, max_loras, device=device, dtype=dtype)
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or 16, max_loras)
        self.max_lora_rank = max_lora_rank
        self._model = model
        self._pin = device.type == "cuda"
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._target = EMPTY_LAYOUT  # layout covering every registered adapter; applied lazily
        self._packed: collections.OrderedDict[str, tuple[SlotLayout, torch.Tensor]] = collections.OrderedDict()
        self._resident: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.counters = collections.Counter()
        self.swap_ms: collections.deque[float] = collections.deque(maxlen=1000)

    # -- registration (any thread) -------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate and cache an adapter under ``name`` (reads it from disk now, so errors surface here)."""
        info = read_adapter(path)
        refuse_unservable(info, engine=ENGINE_LABEL, name=name, serves_dora=True)
        if self.max_lora_rank is not None and info.max_rank > self.max_lora_rank:
            raise ConfigError(f"adapter {name!r} has rank {info.max_rank} > max_lora_rank {self.max_lora_rank}",
                              field="max_lora_rank", hint=f"restart the server with max_lora_rank >= {info.max_rank}")
        weights = read_adapter_weights(name, info, self._model)
        with self._lock:
            if name in self._entries:
                raise ConfigError(f"adapter {name!r} is already loaded", field="lora_name",
                                  hint="unload it first, or pick another name")
            if not self._target.covers(weights):
                self._target = self._target.grown(weights, rank_cap=self.max_lora_rank)
            packed = self._pack(weights)
            self._entries[name] = _Entry(info, weights.rank,
                                         tuple((m, a.shape[1], bt.shape[1]) for m, (a, bt) in weights.modules.items()))
            self._store_packed(name, packed)
        return info

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise KeyError(name)
            del self._entries[name]
            self._packed.pop(name, None)
            self._resident.pop(name, None)  # its slot is free for the next batch

    def evict(self, name: str) -> None:
        """Free ``name``'s device slot (it stays registered and host-cached; the next use swaps it back in)."""
        with self._lock:
            self._resident.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def info(self, name: str) -> AdapterInfo | None:
        with self._lock:
            e = self._entries.get(name)
            return e.info if e else None

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._resident)

    # -- scheduler thread ----------------------------------------------------------------------------
    def acquire(self, names: list[str | None]) -> list[int]:
        """Slot index per batch row (0 = base), swapping adapters into slots as needed (LRU eviction)."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if len(wanted) > self.max_loras:
            raise ValueError(f"{len(wanted)} adapters in one batch > max_loras {self.max_loras}")
        with self._lock:
            missing = [n for n in wanted if n not in self._entries]
            if missing:
                raise KeyError(missing[0])
            if self.slots.layout != self._target:
                self.slots.apply_layout(self._target)
                self._resident.clear()
                self.counters["layout_rebuilds"] += 1
            for n in wanted:
                if n in self._resident:
                    self._resident.move_to_end(n)
                    self.counters["hits"] += 1
            for n in wanted:
                if n in self._resident:
                    continue
                used = set(self._resident.values())
                free = [s for s in range(1, self.max_loras + 1) if s not in used]
                if free:
                    slot = free[0]
                else:
                    victim = next(v for v in self._resident if v not in wanted)
                    slot = self._resident.pop(victim)
                    self.counters["evictions"] += 1
                self._swap_in(n, slot)
                self._resident[n] = slot
            return [0 if n is None else self._resident[n] for n in names]

    def _swap_in(self, name: str, slot: int) -> None:
        packed = self._packed.get(name)
        if packed is None or packed[0] != self.slots.layout:
            # Host cache miss (evicted, or packed for an older layout): read from disk again.
            weights = read_adapter_weights(name, self._entries[name].info, self._model)
            self._store_packed(name, self._pack(weights))
            packed = self._packed[name]
            self.counters["disk_loads"] += 1
        self._packed.move_to_end(name)
        t0 = time.perf_counter()
        self.slots.write(slot, packed[1], dora=self._entries[name].info.use_dora)
        self.swap_ms.append((time.perf_counter() - t0) * 1000)
        self.counters["swaps"] += 1

    def _pack(self, weights: AdapterWeights) -> tuple[SlotLayout, torch.Tensor]:
        layout = self._target
        packed = pack(weights, layout, dtype=self.slots.dtype, pin=self._pin)
        if not torch.isfinite(packed).all():  # finite on disk, but B x scale overflows the serving dtype
            raise ConfigError(
                f"adapter {weights.name!r} ({weights.path}) has weights that overflow {self.slots.dtype} once scaled "
                "by lora_alpha/r", field="adapter", hint="serve it in a wider dtype (dtype='fp32' or 'bf16')")
        return layout, packed

    def _store_packed(self, name: str, packed: tuple[SlotLayout, torch.Tensor]) -> None:
        self._packed[name] = packed
        self._packed.move_to_end(name)
        while len(self._packed) > self.max_cpu_loras:
            self._packed.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            swaps = sorted(self.swap_ms)
            return {
                "max_loras": self.max_loras,
                "resident": dict(self._resident),
                "layout_rank": self._target.rank,
                "layout_modules": len(self._target.modules),
                "host_cached": list(self._packed),
                "swap_ms_median": swaps[len(swaps) // 2] if swaps else None,
                **{k: self.counters[k] for k in ("swaps", "hits", "evictions", "disk_loads", "layout_rebuilds")},
                "shared_shrinks": self.slots.shared_shrinks,  # LoRA shrinks served by a sibling's bmm
            }
