"""GPU test of packed attention through torch's varlen flash attention (tunekit/backends/local/varlen.py).

A small random bf16 Llama (GQA heads, as Llama-3) on one packed row of examples of mixed lengths, as TRL's
padding-free collator lays it out (position ids restarting at 0 at each example): the varlen path's logits and
parameter gradients must equal transformers' sdpa path under its block-diagonal mask within bf16 rounding, the
kernel must have run once per layer, and no T x T mask may be built. Figures (the kernel's signature, forward +
backward time of both paths at 4 x 2048 tokens) go to stdout (`-s`) and to $TUNEKIT_GPU_REPORT.

    python3 -m pytest tests/gpu/test_gpu_varlen.py -m gpu -s
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA (varlen_attn's kernels are CUDA-only)", allow_module_level=True)

from tunekit.backends.local import varlen  # noqa: E402
from tests.tolerance import K_PASS, assert_close, unit_roundoff  # noqa: E402

pytestmark = pytest.mark.gpu

LENGTHS = (700, 1500, 64, 2048, 1, 900, 2048, 330)  # one packed row of 7,591 tokens, a one-token example too


def model(layers: int = 2, hidden: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,  # head dim 128, GQA x4
                      max_position_embeddings=8192, use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    assert m.config._attn_implementation == "sdpa"
    return m


def packed(lengths=LENGTHS):
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    ids = torch.randint(3, 512, pos.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return ids, pos


def forward_backward(m, ids, pos):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, position_ids=pos, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}


def test_varlen_matches_masked_sdpa(figures, monkeypatch):
    from transformers import masking_utils

    k = varlen.kernel()
    assert k is not None, f"torch {torch.__version__} has no varlen_attn"
    fn, params = k
    on, why = varlen.decide("cuda", True, "llama")
    assert on, why
    calls = []
    monkeypatch.setattr(varlen, "kernel", lambda: ((lambda *a, **kw: calls.append(kw) or fn(*a, **kw)), params))

    ids, pos = packed()
    m = model()
    want_logits, want_grads = forward_backward(m, ids, pos)  # transformers' sdpa path, block-diagonal mask
    assert varlen.use(m)
    masks = []
    real_mask = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **kw: masks.append(1) or real_mask(*a, **kw))
    logits, grads = forward_backward(m, ids, pos)
    assert not masks and len(calls) == m.config.num_hidden_layers

    # both paths accumulate in fp32 inside their kernels and differ by where bf16 intermediates are rounded (the
    # attention output, the softmax statistics): one bf16 unit roundoff per rounding, chained K_PASS times. A row
    # attending across its neighbours would be off by O(1). (H200, torch 2.11: logits 0.008, gradients 0.012.)
    eps = unit_roundoff("bfloat16")
    assert_close(logits, want_logits, eps, what="logits")
    assert grads.keys() == want_grads.keys()
    worst = 0.0
    for name, g in grads.items():
        assert_close(g, want_grads[name], eps, what=name)
        worst = max(worst, float((g - want_grads[name]).norm() / want_grads[name].norm().clamp_min(1e-30)))
    figures({"test": "varlen_matches_masked_sdpa", "torch": torch.__version__, "varlen_params": sorted(params),
             "logits_rel": float((logits - want_logits).norm() / want_logits.norm()), "grad_rel_worst": worst,
             "bound": K_PASS * eps})


def test_varlen_step_time(figures):
    """Forward + backward of a packed 4 x 2048-token row (mixed lengths) with both paths: the varlen one must
    not be slower (it skips the masked blocks the sdpa path's kernel visits)."""
    lengths = [2048, 1024, 512, 512, 1900, 148, 700, 300, 1000, 48]  # 8,192 tokens
    ids, pos = packed(lengths)
    m = model(layers=4, hidden=4096)

    def timed() -> float:
        for _ in range(2):
            forward_backward(m, ids, pos)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            forward_backward(m, ids, pos)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 5

    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                                         torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        masked = timed()  # cuDNN off, as train() runs mixed lengths (kernels.sdpa_for_lengths)
        assert varlen.use(m)
        fast = timed()
    figures({"test": "varlen_step_time", "tokens": sum(lengths), "masked_sdpa_s": round(masked, 4),
             "varlen_s": round(fast, 4), "speedup": round(masked / fast, 2)})
    assert fast < masked
