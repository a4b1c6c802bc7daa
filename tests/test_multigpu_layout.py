"""The multi-GPU layout: DDP when a whole (quantized) model and its activations fit one GPU, FSDP2 when not,
refused with the smallest layout that fits; the global batch is always the one-GPU batch."""

from __future__ import annotations

import pytest

from tunekit._exceptions import ConfigError
from tunekit.backends.local.layout import choose, split_batch
from tunekit.backends.local.memory import GiB, estimate

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
GB80, GB141 = 80 * 10**9, 141 * 10**9  # H100 80 GB, H200 141 GB
SHAPES = {"8B": LLAMA_8B, "70B": LLAMA_70B}


def _kw(quant):
    return dict(quantization=quant, r=16, max_length=2048, gradient_checkpointing=True, dtype="bf16")


def _choose(shape, quant, gpus, mem, **kw):
    return choose(SHAPES[shape], gpus=gpus, gpu_memory_bytes=mem, batch_size=16, micro_batch=4,
                  estimate_kwargs=_kw(quant), **kw)


# (shape, quantization, GB per GPU) -> the layout on 1, 2, 4, 8 GPUs; None = refused
EXPECTED = {
    ("8B", "nf4", GB80): ["single", "ddp", "ddp", "ddp"],
    ("8B", "nf4", GB141): ["single", "ddp", "ddp", "ddp"],
    ("8B", "none", GB80): ["single", "ddp", "ddp", "ddp"],
    ("8B", "none", GB141): ["single", "ddp", "ddp", "ddp"],
    ("70B", "nf4", GB80): [None, "fsdp2", "fsdp2", "ddp"],  # 8 ranks: micro-batch 2 per rank fits a whole copy
    ("70B", "nf4", GB141): ["single", "ddp", "ddp", "ddp"],
    ("70B", "none", GB80): [None, None, None, "fsdp2"],
    ("70B", "none", GB141): [None, "fsdp2", "fsdp2", "fsdp2"],
}


@pytest.mark.parametrize("case", list(EXPECTED), ids=lambda c: f"{c[0]}-{c[1]}-{c[2] // 10**9}GB")
def test_layout_for_8b_and_70b_shapes_on_1_2_4_8_gpus(case):
    shape, quant, mem = case
    for gpus, want in zip((1, 2, 4, 8), EXPECTED[case]):
        if want is None:
            with pytest.raises(ConfigError) as exc:
                _choose(shape, quant, gpus, mem)
            assert "smallest layout that fits" in exc.value.hint
            continue
        lay = _choose(shape, quant, gpus, mem)
        assert lay.kind == want, (gpus, lay.summary())
        assert lay.micro_batch * lay.world_size * lay.grad_accum == 16  # the one-GPU global batch
        assert lay.per_gpu_bytes <= 0.92 * mem
        assert lay.quant_storage == ("bf16" if want == "fsdp2" and quant == "nf4" else None)


def test_the_per_gpu_estimate_is_memory_estimate_with_its_sharding_term():
    lay = _choose("70B", "nf4", 2, GB80)
    # FSDP2 steps torch's AdamW (fp32 state, 8 bytes per adapter parameter): bitsandbytes' 8-bit ones cannot
    # step DTensors (layout.optimizer_for)
    fsdp = dict(kbit_upcast=False, optimizer_state_bytes=8)
    one = estimate(LLAMA_70B, micro_batch=4, device_memory_bytes=GB80, **_kw("nf4"), **fsdp)
    two = estimate(LLAMA_70B, micro_batch=4, device_memory_bytes=GB80, **_kw("nf4"), **fsdp, shards=2)
    assert lay.per_gpu_bytes == two.total_bytes
    b1, b2 = one.breakdown, two.breakdown
    assert b2["activations"] == b1["activations"]  # per rank, not split
    assert b2["adapter+optimizer"] == pytest.approx(b1["adapter+optimizer"] / 2, rel=1e-6)
    # the linear weights halve, plus two whole layers being gathered; embeddings/head stay whole
    linear = 80 * sum(a * b for a, b in _linears(LLAMA_70B)) * 4.127 / 8  # NF4 bytes of the decoder's linears
    assert b2["weights"] == pytest.approx(b1["weights"] - linear / 2 + 2 * linear / 80, rel=1e-6)


def test_fsdp2_qlora_is_estimated_with_bitsandbytes_forward_not_the_fused_one():
    """Under FSDP2 the gathered 4-bit weight has no quant state for nf4.py, so bitsandbytes' own forward runs and
    keeps the plain per-layer activations: the per-GPU estimate must not count the fused path's smaller ones."""
    fused = {**_kw("nf4"), "fused_kernels": True}
    lay = choose(LLAMA_70B, gpus=2, gpu_memory_bytes=GB141, batch_size=16, micro_batch=4, estimate_kwargs=fused,
                 layout="fsdp2")
    plain = estimate(LLAMA_70B, micro_batch=4, device_memory_bytes=GB141, **_kw("nf4"), kbit_upcast=False,
                     optimizer_state_bytes=8, shards=2, fused_kernels=False)
    assert lay.kind == "fsdp2" and lay.per_gpu_bytes == plain.total_bytes
    as_fused = estimate(LLAMA_70B, micro_batch=4, device_memory_bytes=GB141, **fused, kbit_upcast=False,
                        optimizer_state_bytes=8, shards=2)
    assert as_fused.total_bytes < plain.total_bytes  # the difference the test guards
    # only the 4-bit case changes: a bf16 LoRA under FSDP2 keeps the estimate of the fused path
    bf16 = choose(LLAMA_70B, gpus=4, gpu_memory_bytes=GB141, batch_size=16, micro_batch=4,
                  estimate_kwargs={**_kw("none"), "fused_kernels": True}, layout="fsdp2")
    assert bf16.estimate.assumptions["fused_kernels"] is True


def _linears(c):
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c[
        "num_attention_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def test_refusal_names_the_smallest_layout_that_fits():
    with pytest.raises(ConfigError) as exc:
        _choose("70B", "none", 1, GB141)
    assert exc.value.field == "provider_options.local.gpus"
    assert "fsdp2 on 2 GPUs" in exc.value.hint and "gpus=2" in exc.value.hint
    with pytest.raises(ConfigError) as exc:
        _choose("70B", "none", 4, GB80)
    assert "fsdp2 on 8 GPUs" in exc.value.hint


def test_forced_ddp_that_does_not_fit_is_refused_and_forced_fsdp2_is_kept():
    with pytest.raises(ConfigError) as exc:
        _choose("70B", "nf4", 2, GB80, layout="ddp")
    assert "DDP on 2 GPUs" in str(exc.value) and "fsdp2 on 2 GPUs" in exc.value.hint
    lay = _choose("8B", "nf4", 2, GB141, layout="fsdp2")
    assert lay.kind == "fsdp2" and "forced" in lay.reason
    with pytest.raises(ConfigError, match="layout must be one of"):
        _choose("8B", "nf4", 2, GB141, layout="zero3")


def test_multi_node_counts_every_rank():
    lay = _choose("70B", "none", 4, GB141, nnodes=2)
    assert (lay.kind, lay.world_size, lay.micro_batch, lay.grad_accum) == ("fsdp2", 8, 2, 1)
    assert "x 2 nodes" in lay.summary()


def test_unknown_gpu_memory_plans_ddp_and_says_it_was_not_checked():
    lay = _choose("70B", "none", 2, None)
    assert lay.kind == "ddp" and "not checked" in lay.reason


@pytest.mark.parametrize("batch,micro,world,want", [(16, 4, 2, (4, 2)), (16, 4, 8, (2, 1)), (12, 4, 2, (3, 2)),
                                                     (8, 1, 2, (1, 4)), (32, 8, 4, (8, 1))])
def test_split_batch_keeps_the_global_batch(batch, micro, world, want):
    assert split_batch(batch, micro, world) == want


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    with pytest.raises(ConfigError) as exc:
        split_batch(6, 2, 4)
    assert exc.value.field == "hyperparameters.batch_size" and "divisible by 4" in exc.value.hint
