"""What one rank of several does differently inside ``train()``: the Trainer's DDP/FSDP2 arguments and the
gathered adapter save (its share of the global batch is in the run's layout). torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE)
says which rank this is; launch.py starts the ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def world_size(layout: dict[str, Any] | None) -> int:
    return int((layout or {}).get("world_size") or 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank() -> bool:
    """Is this process one rank of several (started by torchrun)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def trainer_args(layout: dict[str, Any] | None, model: Any, on_gpu: bool) -> dict[str, Any]:
    """TrainingArguments for the layout: DDP is the Trainer's own under torchrun; FSDP2 through accelerate's
    FSDP plugin (fsdp_version 2), one unit per decoder layer."""
    if world_size(layout) <= 1:
        return {}
    kw: dict[str, Any] = {"ddp_backend": "nccl" if on_gpu else "gloo", "ddp_find_unused_parameters": False,
                          "save_on_each_node": int(layout.get("nnodes") or 1) > 1}  # each node can resume
    if layout["kind"] == "fsdp2":
        layer = type(model.get_decoder().layers[0]).__name__
        kw["fsdp"] = "full_shard auto_wrap"
        kw["fsdp_config"] = {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                             "transformer_layer_cls_to_wrap": [layer], "reshard_after_forward": True,
                             "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False}
    return kw


def save_adapter(model: Any, adapter_dir: Path, save_kw: dict[str, Any]) -> bool:
    """Save the adapter in the standard PEFT format; True where this process wrote it. Across ranks, every
    rank gathers the adapter's shards (FSDP2 DTensors) and each node's local rank 0 writes it."""
    if not is_rank():
        model.save_pretrained(str(adapter_dir), **save_kw)
        return True
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
             for k, v in model.state_dict().items() if k in trainable or "lora_" in k}
    writer = local_rank() == 0
    if writer:
        model.save_pretrained(str(adapter_dir), state_dict=state, **save_kw)
    dist.barrier()  # no rank reads the directory before it is whole
    return writer
