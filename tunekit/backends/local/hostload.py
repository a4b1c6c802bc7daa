"""Host memory of one node's ranks while each loads the base model (layout.with_host checks it before anything starts).

What they hold, read from transformers 5.17/5.24 (`_load_pretrained_model`, core_model_loading) and measured on CPU
(docs/multi-gpu.md):
  - safetensors are memory-mapped (private, copy-on-write) and a tensor whose dtype is the load dtype stays a view
    of the mapping: its pages are the file's page cache, one copy per node however many ranks map the file;
  - a tensor converted on load (checkpoint dtype != load dtype) is a private copy: on the host for a model loaded
    whole there (FSDP2 bf16: no device_map), one tensor at a time per loader thread when loaded onto the GPU;
  - writing a mapped weight (an init that rewrites the base into a residual: PiSSA, OLoRA) copies its pages.
Pure arithmetic over config.json, like memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .memory import HOST_SHARE, _adapted, _dims, _linear_shapes, _text_config, count_params, human_bytes, lora_params

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
LOAD_DTYPE = "bfloat16"  # a GPU rank loads in bf16 (QLoRA's quant storage and non-quantized parts too)
# transformers' core_model_loading.GLOBAL_WORKERS = min(4, CPUs) threads materialize tensors at once; bitsandbytes'
# on-the-fly quantization loads one at a time
LOADER_THREADS = 4


@dataclass
class HostLoading:
    """Host memory of one node's ranks while loading: each rank's own copies and pinned long-context offload (counted
    together: an upper bound of the two phases), which must fit, and the checkpoint's page cache, shared by the ranks
    and reclaimable (clean file pages: the kernel drops them under pressure and reads them again), shown only."""

    ranks: int
    shared_bytes: int  # the checkpoint's pages in the page cache, once per node
    per_rank_bytes: int  # private to each rank: converted weights, rewritten weights
    offload_bytes: int = 0  # per rank: pinned host memory of the activation offload
    host_memory_bytes: int | None = None  # the node's physical memory (None: not known here)
    detail: str = ""

    @property
    def private_bytes(self) -> int:
        """What the ranks hold that the kernel cannot reclaim: what has to fit."""
        return self.ranks * (self.per_rank_bytes + self.offload_bytes)

    @property
    def total_bytes(self) -> int:
        return self.shared_bytes + self.private_bytes

    @property
    def fits(self) -> bool | None:
        return None if not self.host_memory_bytes else self.private_bytes <= HOST_SHARE * self.host_memory_bytes

    def summary(self) -> str:
        off = f" + {human_bytes(self.offload_bytes)} offload pinned" if self.offload_bytes else ""
        return (f"~{human_bytes(self.private_bytes)} private ({self.ranks} rank(s) x "
                f"{human_bytes(self.per_rank_bytes)}{off}) + page cache {human_bytes(self.shared_bytes)} shared, "
                f"reclaimable; {self.detail}")


def checkpoint_dtype(model_config: dict[str, Any]) -> str | None:
    """The dtype the checkpoint's weights are stored in, as config.json says (``dtype``, older ``torch_dtype``)."""
    for c in (_text_config(model_config), model_config):
        name = c.get("dtype") or c.get("torch_dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in DTYPE_BYTES:
            return name.removeprefix("torch.")
    return None


def host_loading(model_config: dict[str, Any], *, ranks: int, whole_on_host: bool, quantized: bool = False,
                 r: int = 0, use_dora: bool = False, mutates_base: bool = False, target_modules: Any = "all-linear",
                 offload_bytes: int = 0, host_memory_bytes: int | None = None) -> HostLoading:
    """Host memory of ``ranks`` ranks of one node loading the base model. ``whole_on_host``: each rank loads the
    whole model into host memory (FSDP2 bf16 LoRA: fully_shard moves it to the GPU later); otherwise each loads onto
    its GPU tensor by tensor (device_map: DDP, one GPU, QLoRA). A checkpoint dtype config.json does not name is
    taken as converted on load (4 bytes on disk): the conservative case. ``r``: the adapter's rank (PEFT creates
    it in fp32 where the base is, on the host for a model loaded whole). Not counted: each process's own runtime
    (torch, the CUDA context's host side), not measured on a GPU host yet."""
    d, counts = _dims(model_config), count_params(model_config)
    stored = checkpoint_dtype(model_config)
    converted = stored != LOAD_DTYPE
    disk = counts["total"] * DTYPE_BYTES.get(stored or "float32", 4)
    load = DTYPE_BYTES[LOAD_DTYPE]
    own, why = 0, []
    if whole_on_host:
        if converted:
            own += counts["total"] * load
            why.append(f"each rank converts the {stored or 'unnamed'} checkpoint to {LOAD_DTYPE} in its own memory")
        else:
            why.append("each rank maps the checkpoint (no copy of its own)")
        if mutates_base:  # the init rewrites the adapted linears: copy-on-write of their pages, per rank
            own += d["layers"] * sum(i * o for i, o in _adapted(d, target_modules)) * load
            why.append("the adapter's init rewrites the adapted base weights (a private copy per rank)")
        own += lora_params(model_config, r, target_modules, use_dora) * 4 if r else 0
    else:
        why.append("each rank loads onto its GPU tensor by tensor")
        if converted:  # the largest tensors being converted at once, on the host
            largest = max(d["vocab"] * d["hidden"], max(i * o for i, o in _linear_shapes(d)))
            own += (1 if quantized else LOADER_THREADS) * largest * load
    if stored is None:
        why.append("checkpoint dtype not in config.json: assumed converted")
    return HostLoading(ranks=ranks, shared_bytes=int(disk), per_rank_bytes=int(own), offload_bytes=int(offload_bytes),
                       host_memory_bytes=host_memory_bytes, detail="; ".join(why))
