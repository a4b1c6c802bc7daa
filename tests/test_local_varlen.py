"""Packed rows through torch's varlen flash attention (tunekit/backends/local/varlen.py), on CPU.

varlen_attn's kernels are CUDA-only, so the varlen path's arithmetic is checked here with a reference kernel in
its place (causal SDPA per example) against transformers' sdpa path under its block-diagonal mask: same logits
and gradients within the dtype's rounding. tests/gpu/test_gpu_varlen.py compares the real kernel on a GPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tunekit.backends.local import varlen  # noqa: E402
from tests.tolerance import assert_close, rounding_eps, unit_roundoff  # noqa: E402

LENGTHS = (5, 9, 3, 7)  # packed examples of one row


def packed_positions(lengths=LENGTHS):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def reference_kernel(*, gqa: bool, is_causal_flag: bool, calls: list | None = None):
    """A stand-in for varlen_attn with one of its signatures: causal SDPA over each example of cu_seqlens."""
    import torch.nn.functional as F

    def ref(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **kw):
        causal = kw.pop("is_causal") if is_causal_flag else kw.pop("window_size") == (-1, 0)
        enable_gqa = kw.pop("enable_gqa", False)
        assert not kw and causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        assert max_q == int(cu_q.diff().max()) and (enable_gqa or q.shape[1] == k.shape[1])
        if calls is not None:
            calls.append(tuple(cu_q.tolist()))
        outs = []
        for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, length, dim]
            outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                       enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(outs)

    names = {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale",
             "is_causal" if is_causal_flag else "window_size"} | ({"enable_gqa"} if gqa else set())
    return ref, frozenset(names)


@pytest.fixture
def on_cpu(monkeypatch):
    """The varlen path allowed on CPU (fp32 too), with the reference kernel; returns the list of its calls."""
    calls: list = []

    def setup(gqa=True, is_causal_flag=False, dtypes=("torch.float32", "torch.bfloat16")):
        monkeypatch.setattr(varlen, "DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(varlen, "DTYPES", dtypes)
        kernel = reference_kernel(gqa=gqa, is_causal_flag=is_causal_flag, calls=calls)
        monkeypatch.setattr(varlen, "kernel", lambda: kernel)
        return calls

    yield setup
    varlen._last[:] = [None, -1, None]


# ------------------------------------------------------------------------------------------------ segments

def test_segments_of_several_packs():
    cu, longest = varlen.segments(packed_positions())
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 14, 17, 24] and longest == 9
    # TRL pads a packed row with position 0: each pad token is an example of its own (as transformers' mask has it)
    cu, longest = varlen.segments(torch.tensor([[0, 1, 2, 0, 1, 0, 0]]))
    assert cu.tolist() == [0, 3, 5, 6, 7] and longest == 3


def test_one_example_or_several_rows_is_not_packed():
    assert varlen.segments(torch.arange(12)[None]) is None  # one example: plain causal attention
    assert varlen.segments(torch.arange(4, 12)[None]) is None  # one example, ids not from 0 (a continuation)
    assert varlen.segments(torch.stack([torch.arange(6), torch.arange(6)])) is None  # a padded batch of rows
    assert varlen.segments(None) is None and varlen.segments(torch.zeros(1, 1, dtype=torch.long)) is None


def test_segments_computed_once_per_position_ids(monkeypatch):
    counted = []
    real = varlen.segments
    monkeypatch.setattr(varlen, "segments", lambda p: counted.append(1) or real(p))
    pos = packed_positions()
    first = varlen.segments_of(pos)
    assert all(varlen.segments_of(pos) is first for _ in range(5)) and len(counted) == 1  # every layer, recompute
    other = packed_positions((3, 4))
    assert varlen.segments_of(other)[0].tolist() == [0, 3, 7] and len(counted) == 2  # the next batch
    other[0, 3] = 3  # changed in place: computed again ([0, 1, 2, 3, 1, 2, 3]: the second example starts at 4)
    assert varlen.segments_of(other)[0].tolist() == [0, 4, 7] and len(counted) == 3
    varlen._last[:] = [None, -1, None]


# ------------------------------------------------------------------------------------------------ decision

def test_decision(monkeypatch):
    monkeypatch.setattr(varlen, "kernel", lambda: reference_kernel(gqa=True, is_causal_flag=False))
    on, why = varlen.decide("cuda", True, "llama")
    assert on and "varlen_attn" in why
    on, why = varlen.decide("cpu", True, "llama")
    assert not on and why.startswith("CUDA only")
    assert varlen.decide("cuda", False, "llama") == (False, "rows are not packed")
    on, why = varlen.decide("cuda", True, "gemma2")
    assert not on and "not covered" in why
    on, why = varlen.decide("cuda", True, "llama", frozenset({"varlen_attention"}))
    assert not on and "speedups" in why
    monkeypatch.setattr(varlen, "kernel", lambda: None)
    on, why = varlen.decide("cuda", True, "llama")
    assert not on and "has no torch.nn.attention.varlen.varlen_attn" in why


def test_speedups_option_names_it():
    from tunekit.backends.local import speed

    assert varlen.SPEEDUP in speed.OPTIMISATIONS and varlen.SPEEDUP in speed.disabled(["-varlen_attention"])


# ------------------------------------------------------------------------------------------------ the model

def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    m.config.use_cache = False  # as train() sets it: with a KV cache, transformers does not look for packing
    return m


def forward_backward(model, ids, pos):
    """Logits and the gradients of every parameter for one packed row."""
    model.zero_grad()
    out = model(input_ids=ids, position_ids=pos, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_falls_back_to_sdpa_unchanged(tiny_model):
    """Without the kernel's device, the registered functions are transformers' sdpa path: bit for bit, packed
    (block-diagonal mask) and padded (a batch of rows with an attention mask)."""
    torch.manual_seed(0)
    plain, switched = load(tiny_model).eval(), load(tiny_model).eval()
    assert varlen.use(switched) and switched.config._attn_implementation == varlen.NAME
    ids = torch.randint(3, plain.config.vocab_size, (1, sum(LENGTHS)))
    with torch.no_grad():
        assert torch.equal(switched(input_ids=ids, position_ids=packed_positions()).logits,
                           plain(input_ids=ids, position_ids=packed_positions()).logits)
        rows = torch.randint(3, plain.config.vocab_size, (2, 10))
        am = torch.ones_like(rows)
        am[1, 6:] = 0
        assert torch.equal(switched(input_ids=rows, attention_mask=am).logits,
                           plain(input_ids=rows, attention_mask=am).logits)


@pytest.mark.parametrize("gqa,is_causal_flag", [(True, False), (False, False), (False, True)],
                         ids=["enable_gqa", "repeat_kv", "is_causal_flag"])
def test_varlen_path_matches_masked_sdpa(tiny_model, on_cpu, monkeypatch, gqa, is_causal_flag):
    """The varlen path (reference kernel) gives the masked sdpa path's logits and gradients, builds no mask,
    and calls the kernel once per layer with the packed examples' boundaries."""
    from transformers import masking_utils

    calls = on_cpu(gqa=gqa, is_causal_flag=is_causal_flag)
    torch.manual_seed(0)
    plain, switched = load(tiny_model), load(tiny_model)
    assert varlen.use(switched)
    ids = torch.randint(3, plain.config.vocab_size, (1, sum(LENGTHS)))
    want_logits, want_grads = forward_backward(plain, ids, packed_positions())

    masks = []
    real_mask = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **k: masks.append(1) or real_mask(*a, **k))
    logits, grads = forward_backward(switched, ids, packed_positions())
    assert not masks  # no T x T mask was built
    assert calls == [(0, 5, 14, 17, 24)] * plain.config.num_hidden_layers

    n = max(sum(LENGTHS), plain.config.intermediate_size, plain.config.hidden_size)
    eps = rounding_eps("float32", n)
    assert_close(logits, want_logits, eps, what="logits")
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert_close(g, want_grads[name], eps, what=name)


def test_packed_row_the_kernel_cannot_take_gets_the_mask(tiny_model, on_cpu):
    """Where the mask function built no mask but the kernel cannot run (here fp32, as on a GPU run in fp32),
    the attention builds transformers' block-diagonal mask itself: the same logits as the sdpa path."""
    calls = on_cpu(dtypes=("torch.bfloat16",))
    torch.manual_seed(0)
    plain, switched = load(tiny_model).eval(), load(tiny_model).eval()
    varlen.use(switched)
    ids = torch.randint(3, plain.config.vocab_size, (1, sum(LENGTHS)))
    with torch.no_grad():
        got = switched(input_ids=ids, position_ids=packed_positions()).logits
        want = plain(input_ids=ids, position_ids=packed_positions()).logits
    assert not calls
    assert_close(got, want, rounding_eps("float32", plain.config.intermediate_size), what="logits")


def test_bf16_varlen_path_matches_masked_sdpa(tiny_model, on_cpu):
    """The same comparison in bf16 (the dtype the kernel runs in on a GPU), within bf16 rounding."""
    calls = on_cpu()
    torch.manual_seed(0)
    plain, switched = load(tiny_model, torch.bfloat16), load(tiny_model, torch.bfloat16)
    varlen.use(switched)
    ids = torch.randint(3, plain.config.vocab_size, (1, sum(LENGTHS)))
    want_logits, want_grads = forward_backward(plain, ids, packed_positions())
    logits, grads = forward_backward(switched, ids, packed_positions())
    assert calls
    # both paths differ by where bf16 intermediates are rounded: one unit roundoff per rounding, K_PASS chained
    eps = unit_roundoff("bfloat16")
    assert_close(logits, want_logits, eps, what="logits")
    for name, g in grads.items():
        assert_close(g, want_grads[name], eps, what=name)


def test_single_unpacked_row_keeps_sdpa(tiny_model, on_cpu):
    """One example in a row (position ids 0..T-1): no mask and no kernel call, sdpa's causal path."""
    calls = on_cpu()
    plain, switched = load(tiny_model).eval(), load(tiny_model).eval()
    varlen.use(switched)
    ids = torch.randint(3, plain.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(switched(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not calls


# ------------------------------------------------------------------------------------------------ train()

@pytest.mark.slow
def test_train_records_the_decision(tiny_model, tmp_path, on_cpu, monkeypatch):
    """On CPU a packed run keeps sdpa and says why; with the path allowed (reference kernel), the same run takes
    it through TRL's padding-free batches: the same first loss (the same weights) within fp32 rounding."""
    pytest.importorskip("trl")
    from tests.test_local_packing import make_spec, mixed_rows, write_jsonl
    from tests.tolerance import bound
    from tests.train_recorder import Recorder
    from tests.train_recorder import train_files as train

    data = write_jsonl(tmp_path / "train.jsonl", mixed_rows())
    rec = Recorder()
    plain = train(make_spec(tiny_model), data, tmp_path / "a", packing=True, max_steps=1, callbacks=rec)
    assert plain.extra["speed"]["applied"]["varlen_attention"] is False
    assert any(m.startswith("attention: sdpa for packed rows (CUDA only") for _, m in rec.events)
    urec = Recorder()
    unpacked = train(make_spec(tiny_model), data, tmp_path / "u", max_steps=1, callbacks=urec)
    assert unpacked.extra["speed"]["applied"]["varlen_attention"] is False
    assert not any(m.startswith("attention: ") and "packed rows" in m for _, m in urec.events)

    calls = on_cpu()
    real = varlen.decide
    monkeypatch.setattr(varlen, "decide", lambda dev, *a: real("cuda", *a))  # as on a GPU
    frec = Recorder()
    fast = train(make_spec(tiny_model), data, tmp_path / "b", packing=True, max_steps=1, callbacks=frec)
    assert fast.extra["speed"]["applied"]["varlen_attention"] is True and calls
    assert any(m.startswith("attention: varlen for packed rows") for _, m in frec.events)
    (got,), (want,) = frec.losses(), rec.losses()
    assert abs(got - want) <= bound(rounding_eps("float32", 256 * 128), abs(want))
