"""FSDP2 without a GPU: PyTorch's ``fully_shard`` runs on CPU over gloo, so the parts of the sharded path that
are tunekit's (the gathered adapter save, the checkpoint format, the plan and the Trainer's arguments at world
size 1) are tested here on the tiny model. The whole path through the Trainer needs CUDA (accelerate applies
its FSDP plugin to GPU ranks only): tests/gpu/test_gpu_fsdp2.py runs it on one GPU."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tunekit._exceptions import ConfigError
from tunekit.backends.local.backend import LocalBackend
from tunekit.schemas.spec import TrainingSpec

torch = pytest.importorskip("torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peft(model_path, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # B != 0 (init_lora_weights=False): a save that dropped or mixed shards shows
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))


def _shard(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.get_base_model().model.layers:  # one unit per decoder layer, as accelerate wraps it
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _ranks_main(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    """One gloo rank: shard the adapted tiny model, save the adapter through ranks.save_adapter, and write the
    checkpoint the Trainer writes for FSDP2 (accelerate's save_fsdp_model, SHARDED_STATE_DICT, adapter only)."""
    import torch.distributed as dist
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model

    from tunekit.backends.local import ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from accelerate import PartialState

        PartialState(cpu=True)  # accelerate's logging in save_fsdp_model needs its state
        model = _shard(_peft(model_path), world)
        layout = {"kind": "fsdp2", "world_size": world, "gpus": world, "nnodes": 1}
        wrote = ranks.save_adapter(model, Path(out) / "adapter", {}, layout)
        Path(out, f"wrote-{rank}").write_text(json.dumps(wrote))
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
        save_fsdp_model(plugin, SimpleNamespace(process_index=rank, num_processes=world), model,
                        str(Path(out) / "checkpoint"), adapter_only=True)
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int, model_path, out: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_ranks_main, args=(world, _free_port(), str(model_path), str(out)), nprocs=world,
                       join=True, start_method="spawn")


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_the_sharded_adapter_is_saved_whole_in_peft_format_and_its_checkpoint_loads_unsharded(tiny_model, tmp_path,
                                                                                             world):
    """Each rank holds half of every LoRA matrix (world 2), or the one DTensor shard of it (world 1, the GPU
    test's layout): the adapter rank 0 writes is the whole one, PEFT loads it, and its logits are those of the
    unsharded model; the Trainer's sharded checkpoint (torch.distributed.checkpoint) loads into one process."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _run_ranks(world, tiny_model, tmp_path)
    assert [json.loads((tmp_path / f"wrote-{r}").read_text()) for r in range(world)] == [True] + [False] * (world - 1)
    reference = _peft(tiny_model)  # the same seeded adapter, never sharded
    expected = get_peft_model_state_dict(reference)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and len(saved) == 7 * 2 * 2  # 7 linears x (A, B) x 2 layers
    for k, v in expected.items():
        assert torch.equal(saved[k], v), k  # gathered exactly: the shards are copies, no arithmetic

    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)

    # resume's format: the adapter's shards only (no frozen base weights), readable at another world size
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = tmp_path / "checkpoint" / "pytorch_model_fsdp_0"
    dcp_to_torch_save(ckpt, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)["model"]
    assert whole.keys() == expected.keys()
    fresh = _peft(tiny_model, seed=1)
    set_peft_model_state_dict(fresh, whole)
    for k, v in get_peft_model_state_dict(fresh).items():
        assert torch.equal(v, expected[k]), k
    del dcp


# ------------------------------------------------------------------------------------------ the plan

def _spec(model, quantization="none", adapter=None, **options) -> TrainingSpec:
    return TrainingSpec(base_model=str(model), quantization=quantization, adapter={"r": 8, "dropout": 0.0,
                                                                                    **(adapter or {})},
                        hyperparameters={"batch_size": 4, "max_length": 64, "epochs": 1},
                        provider_options={"local": {"packing": False, **options}})


@pytest.fixture
def on_gpus(monkeypatch):
    """The plan on a machine with CUDA GPUs (faked where the device is read)."""
    import tunekit.backends.local.layout as layout_mod
    import tunekit.backends.local.resolve as resolve_mod
    from tunekit.backends.local.peft_config import DeviceInfo

    monkeypatch.setattr(resolve_mod, "device_info", lambda device=None: DeviceInfo("cuda", 80 * 10**9, "H100"))
    monkeypatch.setattr(layout_mod, "_visible_gpus", lambda: 1)


@pytest.mark.parametrize("quantization,optimizer,storage", [("none", "adamw_torch_fused", None),
                                                            ("nf4", "adamw_torch_fused", "bf16")])
def test_fsdp2_on_one_gpu_is_a_sharded_layout_of_world_size_1(tiny_model, on_gpus, quantization, optimizer,
                                                              storage):
    plan = LocalBackend().plan(_spec(tiny_model, quantization, gpus=1, layout="fsdp2"))
    layout = plan.request["layout"]
    assert (layout["kind"], layout["world_size"], layout["micro_batch"] * layout["grad_accum"]) == ("fsdp2", 1, 4)
    assert layout["quant_storage"] == storage and layout["reason"] == "forced by provider_options.local.layout"
    # bitsandbytes' 8-bit optimizers cannot step FSDP2's DTensors: torch's fused AdamW, also for QLoRA
    assert plan.request["training"]["optimizer"] == optimizer
    assert any(n.startswith("layout: fsdp2 on 1 GPU(s)") for n in plan.notes)
    # without the option: one plain process, as before (fused AdamW for QLoRA too: resolve.optimizer_name)
    one = LocalBackend().plan(_spec(tiny_model, quantization)).request
    assert one["layout"] is None
    assert one["training"]["optimizer"] == "adamw_torch_fused"


def test_loraplus_under_fsdp2_builds_torch_adamw(tiny_model, on_gpus):
    spec = _spec(tiny_model, "nf4", {"loraplus_lr_ratio": 16}, gpus=1, layout="fsdp2")
    assert LocalBackend().plan(spec).request["training"]["optimizer"] == "loraplus+adamw_torch"


@pytest.mark.parametrize("options,message", [
    ({"layout": "fsdp2"}, "FSDP2 needs CUDA GPUs"),  # CPU: refused, never silently DDP
    ({"layout": "ddp"}, "needs more than one GPU"),
])
def test_fsdp2_on_cpu_and_ddp_on_one_process_are_refused(tiny_model, options, message):
    with pytest.raises(ConfigError, match=message) as exc:
        LocalBackend().plan(_spec(tiny_model, **options))
    assert exc.value.field == "provider_options.local.layout" and exc.value.hint


# ------------------------------------------------------------------------------------------ inside a rank

def test_every_rank_branch_follows_the_layout_not_world_size(tiny_model, monkeypatch):
    """WORLD_SIZE=1 under torchrun: the FSDP2 layout still gets the FSDP arguments and the gathered save."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tunekit.backends.local import ranks

    monkeypatch.setenv("WORLD_SIZE", "1")
    one = {"kind": "fsdp2", "world_size": 1, "gpus": 1, "nnodes": 1, "micro_batch": 4, "grad_accum": 1}
    assert ranks.launched(one) and ranks.sharded(one) and not ranks.launched(None) and not ranks.sharded(None)
    assert not ranks.sharded({**one, "kind": "ddp", "world_size": 2})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    kw = ranks.trainer_args(one, model, on_gpu=True)
    assert kw["fsdp"] is True and kw["ddp_backend"] == "nccl" and kw["save_on_each_node"] is False
    cfg = kw["fsdp_config"]
    assert cfg["version"] == 2 and cfg["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert cfg["state_dict_type"] == "SHARDED_STATE_DICT" and cfg["activation_checkpointing"] is False
    # what accelerate's plugin is built from (transformers reads these keys in 5.17 and 5.24 alike)
    args = object.__new__(TrainingArguments)  # (the full __post_init__ would start a process group)
    args.fsdp, args.fsdp_config = kw["fsdp"], dict(kw["fsdp_config"])
    args.activation_checkpointing = args.gradient_checkpointing = False  # 5.24's name, 5.17's
    plugin = args._process_fsdp_args()
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT" and plugin["reshard_after_forward"] is True
    assert plugin["activation_checkpointing"] is False and plugin["cpu_ram_efficient_loading"] is False
    assert ranks.trainer_args(None, model, on_gpu=True) == {}


def test_the_worker_starts_torchrun_for_a_one_gpu_fsdp2_run(monkeypatch):
    """worker._train hands every layout to launch.py (torchrun), FSDP2 at world size 1 included."""
    from types import SimpleNamespace

    from tunekit.backends.local import launch, worker

    seen = {}
    run = SimpleNamespace(layout={"kind": "fsdp2", "world_size": 1, "gpus": 1, "nnodes": 1},
                          data=SimpleNamespace(train=None, validation=None))
    monkeypatch.setattr(worker, "discard_torn_checkpoints", lambda record: [])
    monkeypatch.setattr(worker, "data_snapshot", lambda file, split: None)
    monkeypatch.setattr("tunekit.backends.local.run.LocalRun.model_validate", staticmethod(lambda request: run))
    monkeypatch.setattr("tunekit.backends.local.run.check_facts", lambda r, spec, **kw: (r, {}))
    monkeypatch.setattr(worker.TrainingSpec, "model_validate", staticmethod(lambda s: s))
    monkeypatch.setattr(launch, "launch", lambda record, cb, r, resume: seen.setdefault("launched", r.layout))
    worker._train(SimpleNamespace(id="tk-1", request={}, spec={}), SimpleNamespace(event=None), None)
    assert seen["launched"]["world_size"] == 1
