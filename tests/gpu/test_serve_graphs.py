"""The embedded server's CUDA-graph decode step equals its eager path (greedy), with mixed adapters and joins.

Skipped without CUDA. A tiny Llama with three LoRA adapters: one batch of base and adapter rows, a joiner
arriving mid-batch (a larger bucket: a new capture), rows leaving. In fp32 the graph path gives the eager
path's tokens (different kernels round differently only at fp32's ~1e-7, far from flipping an argmax of
these logits); in bf16 a replayed graph runs the very kernels of the static path it captured, so their
tokens are equal too.
"""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("peft")

from tests.conftest_serve import make_adapter  # noqa: E402

pytestmark = pytest.mark.gpu
# transformers' own RoPE, taken when the tests are collected (before any test applies Liger's, which replaces it)
PLAIN_ROPE = __import__("transformers.models.llama.modeling_llama", fromlist=["x"]).apply_rotary_pos_emb
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "Yo"]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": str(make_adapter(tiny_model, root / "a", r=4, target_modules=("q_proj", "v_proj"), seed=1)),
            "b": str(make_adapter(tiny_model, root / "b", r=16, target_modules="all-linear", seed=2)),
            "c": str(make_adapter(tiny_model, root / "c", r=8, target_modules="all-linear", seed=3))}


@pytest.fixture(scope="module")
def dora_adapter(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    return str(make_adapter(tiny_model, root / "d", r=8, target_modules="all-linear", seed=4, use_dora=True))


def _serve(engine, jobs: list[tuple], late: list[tuple]) -> list[str]:
    """``jobs`` lined up as one batch; ``late`` submitted once the batch has decoded a few steps."""
    out: dict[int, str] = {}

    def call(i: int, adapter, prompt, n) -> None:
        out[i] = engine.generate(prompt, adapter, max_tokens=n, temperature=0).text

    threads = [threading.Thread(target=call, args=(i, *job)) for i, job in enumerate(jobs)]
    with engine.paused():
        for t in threads:
            t.start()
        while engine.pending() < len(jobs):
            time.sleep(0.005)
    while engine.stats().get("forward_passes", 0) < 4:
        time.sleep(0.001)
    late_threads = [threading.Thread(target=call, args=(len(jobs) + i, *job)) for i, job in enumerate(late)]
    for t in late_threads:
        t.start()
    for t in threads + late_threads:
        t.join(timeout=300)
    return [out[i] for i in range(len(jobs) + len(late))]


@pytest.mark.parametrize("dtype,reference", [("fp32", "eager"), ("bf16", "static")])
def test_graph_decode_equals_the_reference_path(tiny_model, adapters, dtype, reference):
    from tunekit.serve.embedded.engine import Engine

    jobs = [(a, p, 40) for a in (None, "a", "b") for p in PROMPTS[:2]]
    late = [("c", PROMPTS[2], 10), (None, PROMPTS[1] * 3, 10), ("a", PROMPTS[0], 10)]
    texts = {}
    for decode in ("graphs", reference):
        engine = Engine(str(tiny_model), adapters, max_loras=3, device="cuda", dtype=dtype, batch_window_ms=0,
                        decode=decode)
        try:
            engine.eos_ids = set()  # every row runs to max_tokens
            assert engine.stats()["decode"] == decode
            texts[decode] = _serve(engine, jobs, late)
            assert engine.stats().get("failed_batches", 0) == 0
            if decode == "graphs":
                assert engine.stats()["joined_rows"] >= 1  # the late rows joined the running batch
        finally:
            engine.close()
    assert texts["graphs"] == texts[reference]


def test_liger_kernels_decode_like_the_plain_model(tiny_model, adapters, monkeypatch):
    """Liger's RMSNorm/RoPE/SwiGLU under the CUDA graphs give the plain model's greedy tokens (fp32: the kernels
    round differently only at fp32's ~1e-7), with mixed adapters and a join; `kernels` is reported."""
    from tunekit.serve.embedded.engine import Engine

    pytest.importorskip("liger_kernel")
    jobs = [(a, p, 40) for a in (None, "a", "b") for p in PROMPTS[:2]]
    late = [("c", PROMPTS[2], 10), (None, PROMPTS[1] * 3, 10)]
    texts = {}
    import transformers.models.llama.modeling_llama as llama

    for kernels, decode in (("off", "eager"), ("liger", "graphs")):
        if kernels == "off":  # Liger's RoPE is process-wide: an earlier test of this session may have installed it
            monkeypatch.setattr(llama, "apply_rotary_pos_emb", PLAIN_ROPE)
        engine = Engine(str(tiny_model), adapters, max_loras=3, device="cuda", dtype="fp32", batch_window_ms=0,
                        decode=decode, kernels=kernels)
        try:
            engine.eos_ids = set()
            assert engine.stats()["kernels"] == kernels
            texts[kernels] = _serve(engine, jobs, late)
            assert engine.stats().get("failed_batches", 0) == 0
        finally:
            engine.close()
    assert texts["liger"] == texts["off"]


def test_lora_decode_kernels_give_the_bmm_paths_tokens(tiny_model, adapters):
    """On CUDA mixed-adapter decode steps run lora_triton's kernels (reported as `lora_decode`), fused into Liger's
    norms and SwiGLU MLPs (lora_fusion); in fp32, with graphs, a join and rows leaving, they give the greedy tokens
    of the gathers + bmm path (eager)."""
    from tunekit.serve.embedded.engine import Engine

    jobs = [(a, p, 40) for a in (None, "a", "b", "c") for p in PROMPTS[:2]]
    late = [("c", PROMPTS[2], 10), ("b", PROMPTS[1] * 3, 10)]
    texts = {}
    for kernels, decode in ((False, "eager"), (True, "graphs")):
        engine = Engine(str(tiny_model), adapters, max_loras=3, device="cuda", dtype="fp32", batch_window_ms=0,
                        decode=decode)
        try:
            assert engine.stats()["lora_decode"] == "triton"
            engine.pool.slots.kernels = kernels
            engine.eos_ids = set()
            texts[kernels] = _serve(engine, jobs, late)
            stats = engine.stats()
            assert stats.get("failed_batches", 0) == 0
            if kernels:  # lora_fusion rode on Liger's norms and SwiGLU MLPs (b and c target every linear layer)
                layers = engine.model.config.num_hidden_layers
                assert stats["lora_fused"] == {"norm_shrink": 2 * layers, "swiglu": layers}
        finally:
            engine.close()
    assert texts[True] == texts[False]


def test_dora_rows_through_the_fused_kernels_give_the_bmm_paths_tokens(tiny_model, adapters, dora_adapter):
    """DoRA rows next to LoRA and base rows: the fused kernels (gains applied in the expand and in the SwiGLU
    launch) under graphs give the greedy tokens of the gathers + bmm path (eager), in fp32."""
    from tunekit.serve.embedded.engine import Engine

    served = {"b": adapters["b"], "d": dora_adapter}
    jobs = [(a, p, 40) for a in (None, "b", "d") for p in PROMPTS[:2]]
    late = [("d", PROMPTS[2], 10)]
    texts = {}
    for kernels, decode in ((False, "eager"), (True, "graphs")):
        engine = Engine(str(tiny_model), served, max_loras=2, device="cuda", dtype="fp32", batch_window_ms=0,
                        decode=decode)
        try:
            engine.pool.slots.kernels = kernels
            engine.eos_ids = set()
            texts[kernels] = _serve(engine, jobs, late)
            stats = engine.stats()
            assert stats.get("failed_batches", 0) == 0
            if kernels:
                assert stats["lora_fused"]["swiglu"] == engine.model.config.num_hidden_layers
        finally:
            engine.close()
    assert texts[True] == texts[False]
