"""Host memory of the ranks' loading (issue 17): what each rank of one node holds in host memory while it loads the
base model, planned (hostload.host_loading, layout.with_host) and refused when it does not fit the node, instead of
found by the OOM killer. The figures are recomputed here from the published parameter counts of the Llama-3.1
shapes, not from memory.py."""

from __future__ import annotations

import json
import sys

import pytest

from tests.test_multigpu_layout import GB141, LLAMA_8B, LLAMA_70B
from tunekit._exceptions import ConfigError
from tunekit.backends.local import hostload, memory
from tunekit.backends.local.layout import choose, with_host

GiB = memory.GiB
H200_HOST_4X, BIG_HOST = 512 * GiB, 2048 * GiB  # the 4xH200 machine that may be lent; a 2 TiB host
PARAMS = {"8B": 8_030_261_248, "70B": 70_553_706_496}  # Llama-3.1-8B / -70B (their model cards' counts)
LORA16 = {"8B": 41_943_040, "70B": 207_093_760}  # r=16 all-linear LoRA parameters (PEFT's trainable count)
LARGEST = {"8B": 128_256 * 4096, "70B": 128_256 * 8192}  # the embedding / head matrix
SHAPES = {"8B": LLAMA_8B, "70B": LLAMA_70B}


def _cfg(shape, stored="bfloat16"):
    return {**SHAPES[shape], **({"torch_dtype": stored} if stored else {})}


def _layout(shape, quant, gpus, stored="bfloat16", nnodes=1):
    return choose(_cfg(shape, stored), gpus=gpus, nnodes=nnodes, gpu_memory_bytes=GB141, batch_size=16, micro_batch=4,
                  estimate_kwargs=dict(quantization=quant, r=16, max_length=2048, gradient_checkpointing=True))


def _host(shape, quant, gpus, host, stored="bfloat16", **kw):
    lay = _layout(shape, quant, gpus, stored)
    return with_host(lay, _cfg(shape, stored), host_memory_bytes=host, quantized=quant == "nf4", r=16, **kw)


@pytest.mark.parametrize("shape", ["8B", "70B"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_the_host_figure_of_8b_and_70b_on_1_2_4_8_ranks(shape, quant, stored):
    for gpus in (1, 2, 4, 8):
        # 70B bf16 LoRA does not fit one GPU of 141 GB in any layout: its host figure is that of one sharded rank
        kind = "fsdp2" if (shape, quant, gpus) == ("70B", "none", 1) else _layout(shape, quant, gpus, stored).kind
        host = hostload.host_loading(_cfg(shape, stored), ranks=gpus, quantized=quant == "nf4", r=16,
                                   whole_on_host=kind == "fsdp2" and quant == "none")
        # the checkpoint is read once per node, whatever the number of ranks: its page cache is shared
        assert host.shared_bytes == PARAMS[shape] * (2 if stored == "bfloat16" else 4)
        if kind == "fsdp2" and quant == "none":  # loaded whole into host memory, by each rank
            own = LORA16[shape] * 4  # the fp32 adapter PEFT creates where the base is
            if stored != "bfloat16":
                own += PARAMS[shape] * 2  # each rank's bf16 copy of the converted weights
        else:  # DDP / one GPU / QLoRA: onto the GPU tensor by tensor
            own = 0 if stored == "bfloat16" else (1 if quant == "nf4" else 4) * LARGEST[shape] * 2
        assert host.per_rank_bytes == own, (gpus, kind)
        assert host.private_bytes == gpus * own and host.total_bytes == host.shared_bytes + gpus * own
    # which path the layout takes: 70B bf16 LoRA is FSDP2 from 2 GPUs of 141 GB, 8B always a whole copy per GPU
    assert [_layout(shape, quant, g).kind for g in (2, 4, 8)] == (
        ["fsdp2"] * 3 if (shape, quant) == ("70B", "none") else ["ddp"] * 3)


def test_70b_bf16_fsdp2_on_4_ranks_converting_its_checkpoint_is_refused_on_512_gib():
    with pytest.raises(ConfigError) as exc:
        _host("70B", "none", 4, H200_HOST_4X, stored="float32")
    e = exc.value
    assert e.field == "provider_options.local.gpus"
    # 4 ranks x (70.55e9 x 2 B + the fp32 adapter), each its own copy: 528.8 GiB > 75% of 512 GiB
    private = 4 * (PARAMS["70B"] * 2 + LORA16["70B"] * 4)
    assert f"~{private / GiB:.2f} GiB of host memory" in str(e) and "512.00 GiB" in str(e)
    assert "per GPU" in str(e)  # shown with the per-GPU figure
    # 2 ranks are 264.4 GiB <= 384 GiB: the hint names them, and the other ways out
    assert "provider_options.local.gpus=2" in e.hint and "QLoRA" in e.hint
    assert "nnodes" in e.hint and "more memory" in e.hint
    # a config.json that does not name its dtype is taken as converted: the same refusal
    with pytest.raises(ConfigError):
        _host("70B", "none", 4, H200_HOST_4X, stored=None)


def test_the_same_run_fits_a_2_tib_host_and_the_plan_shows_both_figures():
    lay = _host("70B", "none", 4, BIG_HOST, stored="float32")
    assert lay.kind == "fsdp2" and lay.host_memory_bytes == BIG_HOST
    assert lay.host_bytes == 4 * (PARAMS["70B"] * 2 + LORA16["70B"] * 4)
    text = lay.summary()
    assert "per GPU" in text and f"host memory while loading ~{lay.host_bytes / GiB:.2f} GiB private" in text
    assert f"page cache {PARAMS['70B'] * 4 / GiB:.2f} GiB shared" in text


def test_a_bf16_checkpoint_is_mapped_not_copied_so_4_ranks_fit_512_gib():
    """Each rank's bf16 weights are views of the same file mapping (see the test below): only the adapter is its own."""
    lay = _host("70B", "none", 4, H200_HOST_4X)
    assert lay.host_bytes == 4 * LORA16["70B"] * 4
    assert "no copy of its own" in lay.host_note


def test_an_init_that_rewrites_the_base_copies_it_in_every_rank():
    # PiSSA writes the residual into the mapped weights: copy-on-write, a private copy of the adapted linears per rank
    with pytest.raises(ConfigError) as exc:
        _host("70B", "none", 4, H200_HOST_4X, mutates_base=True)
    assert "rewrites the adapted base weights" in str(exc.value)
    assert _host("70B", "none", 4, BIG_HOST, mutates_base=True).host_bytes > 4 * 68 * 10**9 * 2


def test_qlora_loads_onto_the_gpus_and_fits_whatever_the_checkpoint():
    lay = _host("70B", "nf4", 4, H200_HOST_4X, stored="float32")
    assert lay.host_bytes == 4 * LARGEST["70B"] * 2  # one tensor converted at a time (on-the-fly quantization)
    assert "onto its GPU" in lay.host_note


def test_long_context_offload_counts_with_the_loading():
    base = _host("70B", "none", 4, BIG_HOST).host_bytes
    lay = _host("70B", "none", 4, BIG_HOST, offload_bytes=40 * GiB)
    assert lay.host_bytes == base + 4 * 40 * GiB and "offload pinned" in lay.host_note
    with pytest.raises(ConfigError):  # 4 x 100 GiB pinned > 384 GiB
        _host("70B", "none", 4, H200_HOST_4X, offload_bytes=100 * GiB)


def test_another_nodes_host_is_not_guessed():
    lay = _layout("70B", "none", 4, "float32", nnodes=2)
    out = with_host(lay, _cfg("70B", "float32"), host_memory_bytes=None, quantized=False, r=16)
    assert out.host_memory_bytes is None and "not checked: the host memory of the nodes is not known here" in out.host_note
    assert out.host_bytes == 4 * (PARAMS["70B"] * 2 + LORA16["70B"] * 4)  # per node: its 4 ranks


def test_the_plan_checks_this_hosts_memory(tmp_path, monkeypatch):
    """Through LocalBackend.plan on a (faked) 4-GPU machine: refused on a 512 GiB host, planned on a 2 TiB one."""
    import tunekit.backends.local.layout as layout_mod
    import tunekit.backends.local.resolve as resolve_mod
    from tunekit.backends.local.backend import LocalBackend
    from tunekit.backends.local.peft_config import DeviceInfo
    from tunekit.schemas.spec import TrainingSpec

    model = tmp_path / "llama-70b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**_cfg("70B", "float32"), "model_type": "llama"}))
    monkeypatch.setattr(resolve_mod, "device_info", lambda device=None: DeviceInfo("cuda", GB141, "H200"))
    monkeypatch.setattr(layout_mod, "_visible_gpus", lambda: 4)
    spec = TrainingSpec(base_model=str(model), quantization="none", adapter={"r": 16},
                        hyperparameters={"batch_size": 16, "gradient_accumulation_steps": 4, "max_length": 2048},
                        provider_options={"local": {"gpus": 4}})
    monkeypatch.setattr(resolve_mod, "host_memory_bytes", lambda: H200_HOST_4X)
    with pytest.raises(ConfigError) as exc:
        LocalBackend().plan(spec)
    assert exc.value.field == "provider_options.local.gpus" and "gpus=2" in exc.value.hint
    monkeypatch.setattr(resolve_mod, "host_memory_bytes", lambda: BIG_HOST)
    plan = LocalBackend().plan(spec)
    assert plan.request["layout"]["host_memory_bytes"] == BIG_HOST
    assert any("host memory while loading" in n and "per GPU" in n for n in plan.notes)


# ------------------------------------------------------------------- the loading behaviour the figures rest on

def _mapped(path) -> list[tuple[int, int]]:
    out = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path):
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("load_dtype,mapped", [("bfloat16", True), ("float32", False)])
def test_transformers_keeps_weights_of_the_load_dtype_as_views_of_the_mapped_checkpoint(tmp_path, load_dtype, mapped):
    """The fact host_loading rests on: from_pretrained without a device_map leaves a tensor whose checkpoint dtype is the
    load dtype a view of the safetensors file's mapping (page cache, shared by every process mapping the file), and
    converts the others into memory of its own."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=getattr(torch, load_dtype))
    ranges = _mapped(weights.resolve())  # converted, nothing is left referencing the mapping: it is gone
    assert bool(ranges) == mapped
    inside = [any(a <= p.data_ptr() < b for a, b in ranges) for p in model.parameters()]
    assert all(inside) if mapped else not any(inside)
