"""What a rank under torchrun does differently inside ``train()``: its device, the Trainer's DDP/FSDP2 arguments
and mixed precision, and the gathered adapter save (its share of the global batch is in the run's layout).
Every branch asks the run's stored layout, not WORLD_SIZE: FSDP2 on one GPU (world size 1) takes the sharded
path of N ranks. torchrun's environment (RANK, LOCAL_RANK) says which rank this is; launch.py starts the ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def world_size(layout: dict[str, Any] | None) -> int:
    return int((layout or {}).get("world_size") or 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 for one plain process): they share its host memory."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched(layout: dict[str, Any] | None) -> bool:
    """Is a run of this stored layout trained by ranks under torchrun (launch.py)? Every layout is, FSDP2 on one
    GPU too (world size 1: the sharded path of N ranks, run on one); None is one plain process."""
    return layout is not None


def sharded(layout: dict[str, Any] | None) -> bool:
    """Does the layout shard the model (FSDP2), whatever its number of ranks?"""
    return (layout or {}).get("kind") == "fsdp2"


def init_device(layout: dict[str, Any] | None, on_gpu: bool) -> None:
    """A rank's CUDA device is its local rank's, before anything is loaded: bitsandbytes' quantizer and NCCL
    place on the current device, which is GPU 0 on every rank otherwise."""
    if launched(layout) and on_gpu:
        import torch

        torch.cuda.set_device(local_rank())


def trainer_args(layout: dict[str, Any] | None, model: Any, on_gpu: bool) -> dict[str, Any]:
    """TrainingArguments for the layout: DDP is the Trainer's own under torchrun; FSDP2 through accelerate's
    FSDP plugin, one unit per decoder layer. Keys that transformers 5.17 and 5.24 both read: ``fsdp=True``
    with everything in ``fsdp_config`` (the string form "full_shard auto_wrap" is deprecated)."""
    if not launched(layout):
        return {}
    kw: dict[str, Any] = {"ddp_backend": "nccl" if on_gpu else "gloo", "ddp_find_unused_parameters": False,
                          "save_on_each_node": int(layout.get("nnodes") or 1) > 1}  # each node can resume
    if sharded(layout):
        layer = type(model.get_decoder().layers[0]).__name__
        kw["fsdp"] = True
        kw["fsdp_config"] = {
            "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": [layer],
            "reshard_after_forward": True,
            # checkpoints hold the adapter's shards only (the Trainer saves FSDP models with adapter_only) in
            # torch.distributed.checkpoint's format, which loads into another number of ranks too
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,  # every rank loads the model (see docs/multi-gpu.md)
            # checkpointing stays the speed plan's, per decoder layer (kernels.set_checkpointing): it runs inside
            # each layer's FSDP unit, whose recompute in backward finds the layer gathered already
            "activation_checkpointing": False,
        }
    return kw


def after_trainer(trainer: Any, layout: dict[str, Any] | None) -> None:
    """FSDP2's mixed precision: compute in bf16 (the gathered parameters), reduce gradients across ranks in fp32
    (accelerate's default reduces in bf16, rounding every rank's gradient before the sum). Set before
    ``train()``, where accelerate applies ``fully_shard``."""
    if not sharded(layout):
        return
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = trainer.accelerator.state.fsdp_plugin
    if trainer.args.bf16:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp_units(model: Any) -> int:
    """How many modules of the trained model FSDP2 manages (0: not sharded): the record that it really was."""
    if not hasattr(model, "modules"):
        return 0
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules())


def adapter_state(model: Any) -> dict[str, Any]:
    """The adapter's tensors, whole and on the CPU: FSDP2's DTensor shards gathered (a collective: every rank
    calls it, in the same order), plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in model.state_dict().items() if k in trainable or "lora_" in k}


def save_adapter(model: Any, adapter_dir: Path, save_kw: dict[str, Any], layout: dict[str, Any] | None) -> bool:
    """Save the adapter in the standard PEFT format; True where this process wrote it. Under a layout every rank
    gathers the adapter's shards (FSDP2 DTensors, at world size 1 too) and each node's local rank 0 writes it."""
    if not launched(layout):
        model.save_pretrained(str(adapter_dir), **save_kw)
        return True
    import torch.distributed as dist

    state = adapter_state(model)
    writer = local_rank() == 0
    if writer:
        model.save_pretrained(str(adapter_dir), state_dict=state, **save_kw)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank reads the directory before it is whole
    return writer
