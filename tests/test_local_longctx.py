"""Long context: activation offload and the tiled MLP (longctx.py), their memory terms, and the plan's choice.

Numerics on CPU with the tiny Llama: the offload path gives the plain checkpointed path's gradients exactly (the
same values come back from host memory), the tiled MLP the untiled one's within the rounding of summing the
weight gradients over tokens in another order (tests/tolerance.py). The plan on the Llama-3.1-8B shape. CUDA-only
cases (pinned memory, bf16 autocast on the GPU) skip without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tunekit._exceptions import ResourceError  # noqa: E402
from tunekit.backends.local import kernels, longctx, memory, speed  # noqa: E402
from tunekit.schemas.spec import TrainingSpec  # noqa: E402
from tests.tolerance import adam_scale, assert_close, rounding_eps  # noqa: E402
from tests.train_recorder import Recorder  # noqa: E402

GiB = 2**30
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, model_type="llama")
H200, H200_HOST = 139 * GiB, 128 * GiB  # the GPU machine: one H200, 128 GiB of host memory


def _peft_model(tiny_model, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                       LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    with torch.no_grad():  # B != 0, so every adapter parameter has a gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    m.train()
    return m


def _grads(m, ids):
    import torch

    torch.manual_seed(1)
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- offload

def test_offload_gives_the_checkpointed_paths_gradients_exactly(tiny_model):
    import torch

    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    plain = _peft_model(tiny_model)
    assert kernels.set_checkpointing(plain.get_base_model(), 2) == 2
    ref_loss, ref = _grads(plain, ids)

    m = _peft_model(tiny_model)
    kernels.set_checkpointing(m.get_base_model(), 2)
    n, stats = longctx.offload_checkpointed_inputs(m.get_base_model(), 1)
    assert n == 1
    loss, got = _grads(m, ids)
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    # one tensor per offloaded layer, and it is the layer's input hidden state (nothing saved inside the layer)
    assert (stats.tensors, stats.restored) == (1, 1)
    assert stats.bytes == ids.numel() * hidden * 4
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k  # the same values come back: bit for bit


def test_offload_hooks_move_only_tensors_with_data():
    """Empty saved tensors (torch's checkpoint saves placeholders on CUDA) stay where they are, uncounted."""
    import torch

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, empty):
            ctx.save_for_backward(x, empty)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            x, empty = ctx.saved_tensors
            assert empty.numel() == 0 and x.shape == g.shape
            return g * 2, None

    stats = longctx.OffloadStats()
    x = torch.randn(3, requires_grad=True)
    with longctx.offload_hooks(stats):
        y = Double.apply(x, torch.empty(0))
    y.sum().backward()
    assert (stats.tensors, stats.restored, stats.bytes) == (1, 1, 12)
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_offload_is_routed_once_and_only_through_checkpointed_layers(tiny_model):
    m = _peft_model(tiny_model)
    base = m.get_base_model()
    assert longctx.offload_checkpointed_inputs(base, 2)[0] == 0  # nothing checkpointed: nothing to offload
    kernels.set_checkpointing(base, 1)
    assert longctx.offload_checkpointed_inputs(base, 2)[0] == 1
    first = base.model.layers[0]._gradient_checkpointing_func
    longctx.offload_checkpointed_inputs(base, 2)  # again: not wrapped twice
    again = base.model.layers[0]._gradient_checkpointing_func
    assert again.args[0] is first.args[0]


# ----------------------------------------------------------------------------- tiled MLP

@pytest.mark.parametrize("fast_lora", [False, True])
def test_tiled_mlp_gives_the_untiled_gradients(tiny_model, fast_lora):
    """Every LoRA parameter's gradient (and the loss) within fp32 rounding of the untiled MLP's: the same
    arithmetic per token; the weight gradients are sums over the tokens, per tile then across tiles."""
    import torch

    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(3))

    def arm(tile: int):
        m = _peft_model(tiny_model)
        if fast_lora:
            kernels.patch_lora(m)
        kernels.set_checkpointing(m.get_base_model(), 1)  # layer 0 checkpointed (its MLP runs 3 times), layer 1 not
        if tile:
            assert longctx.tile_mlps(m.get_base_model(), tile) == 2
        return _grads(m, ids)

    ref_loss, ref = arm(0)
    loss, got = arm(7)  # 80 tokens in tiles of 7: uneven, the last one short
    eps = rounding_eps("float32", ids.numel())
    assert_close(loss, ref_loss, eps, what="loss")
    assert got.keys() == ref.keys() and len(ref) == 2 * 7 * 2
    for k in ref:
        assert_close(got[k], ref[k], eps, what=k)


def test_tiled_mlp_under_bf16_autocast_stays_within_bf16_rounding():
    """The tiles' backward recomputes under the forward's autocast (the GPU recipe's bf16 matmuls)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=32, intermediate_size=96)
    torch.manual_seed(0)
    wrap = torch.nn.Module()
    wrap.mlp = LlamaMLP(cfg)
    m = get_peft_model(wrap, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0, 0.1)
    mlp = m.base_model.model.mlp
    x = torch.randn(3, 50, 32, requires_grad=True)

    def arm(tiled: bool):
        m.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = (longctx._tiled_forward(mlp, mlp.forward, 16, x) if tiled else mlp(x))
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach().float(), x.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                     if p.requires_grad}

    y0, gx0, g0 = arm(False)
    y1, gx1, g1 = arm(True)
    eps = rounding_eps("bfloat16", x.shape[0] * x.shape[1])
    assert_close(y1, y0, eps, what="output")
    assert_close(gx1, gx0, eps, what="input grad")
    for k in g0:
        assert_close(g1[k], g0[k], eps, what=k)


def test_tiled_mlp_replays_each_tiles_dropout_masks():
    """With LoRA dropout, backward must see the masks the tile's forward drew: equal to the same tiles computed
    with a graph (a loop of the MLP over the tiles, no recompute), to fp32 rounding."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    wrap = torch.nn.Module()
    wrap.mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96))
    m = get_peft_model(wrap, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.5))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0, 0.5)
    m.train()
    mlp = m.base_model.model.mlp
    assert longctx._dropout_active(mlp)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.linspace(-1, 1, 32)

    def arm(f):
        m.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        (f() * w).sum().backward()
        return x.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    gx_ref, g_ref = arm(lambda: torch.cat([mlp(x[a:a + 16]) for a in range(0, 64, 16)]))
    gx, g = arm(lambda: longctx._tiled_forward(mlp, mlp.forward, 16, x))
    eps = rounding_eps("float32", 64)
    assert_close(gx, gx_ref, eps, what="input grad")
    for k in g_ref:
        assert_close(g[k], g_ref[k], eps, what=k)
    # and without the replay the masks differ (the check above is not vacuous)
    gx_bad, _ = arm(lambda: longctx.TiledMLP.apply(mlp.forward, 16, False, x,
                                                    *[p for p in mlp.parameters() if p.requires_grad]))
    assert float((gx_bad - gx_ref).norm()) > 0.1 * float(gx_ref.norm())


def test_tiled_mlp_runs_untiled_when_short_or_without_grad(tiny_model, monkeypatch):
    import torch

    m = _peft_model(tiny_model)
    base = m.get_base_model()
    assert longctx.tile_mlps(base, 8) == 2 and longctx.tile_mlps(base, 8) == 0  # once
    calls = []
    real = longctx.TiledMLP.apply
    monkeypatch.setattr(longctx.TiledMLP, "apply", lambda *a: calls.append(a[3].shape) or real(*a))
    mlp = base.model.layers[0].mlp
    width = mlp.gate_proj.in_features
    with torch.no_grad():
        mlp(torch.randn(1, 40, width))  # no backward: nothing to save memory for
    mlp(torch.randn(1, 8, width, requires_grad=True))  # one tile
    assert calls == []
    mlp(torch.randn(2, 20, width, requires_grad=True))
    assert calls == [torch.Size([2, 20, width])]


def test_attention_gets_no_sequence_by_sequence_mask_for_unpadded_rows(tiny_model, monkeypatch):
    """transformers' sdpa path: one unpadded row (the long-context case), with or without an all-ones attention
    mask, and equal-length rows pass no mask and is_causal (the flash kernel); padded and packed rows (position ids
    restarting) get a [batch, 1, S, S] mask, which docs/local.md says to avoid at long lengths."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    m.config.use_cache = False  # as in training (a cache turns the packed-row detection off)
    m.train()
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        mask = k.get("attn_mask")
        seen.append((None if mask is None else tuple(mask.shape), k.get("is_causal")))
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    S = 48

    def first(ids, **kw):
        seen.clear()
        m(input_ids=ids, **kw)
        return seen[0]

    one = torch.randint(0, 200, (1, S))
    assert first(one) == (None, True)
    assert first(one, attention_mask=torch.ones(1, S, dtype=torch.long)) == (None, True)
    assert first(torch.randint(0, 200, (2, S)), attention_mask=torch.ones(2, S, dtype=torch.long)) == (None, True)
    padded = torch.ones(1, S, dtype=torch.long)
    padded[0, -5:] = 0
    assert first(one, attention_mask=padded) == ((1, 1, S, S), False)
    packed = torch.cat([torch.arange(20), torch.arange(S - 20)]).unsqueeze(0)
    assert first(one, position_ids=packed) == ((1, 1, S, S), False)


# ----------------------------------------------------------------------------- memory terms

def test_offload_and_tiled_mlp_terms():
    kw = dict(micro_batch=1, max_length=131072, quantization="nf4", r=16, kbit_upcast=False, fused_lm_head=True,
              device_memory_bytes=H200)
    base = memory.estimate(LLAMA_8B, **kw)
    state = 131072 * 4096 * 2  # one bf16 hidden state: 1 GiB, a power of two
    off = memory.estimate(LLAMA_8B, **kw, offload_layers=10)
    # 10 inputs leave the GPU, one comes back for its recompute (overhead: the fragmentation share of it)
    assert base.total_bytes - off.total_bytes == pytest.approx(9 * state * (1 + memory.FRAGMENTATION), rel=1e-6)
    assert off.host_bytes == 10 * state and base.host_bytes == 0 and "host" in off.summary()
    tiled = memory.estimate(LLAMA_8B, **kw, tiled_mlp=True)
    saved = (131072 - memory.MLP_TILE_TOKENS) * 14336 * memory.I_COEF * 2
    assert base.total_bytes - tiled.total_bytes == pytest.approx(saved * (1 + memory.FRAGMENTATION), rel=1e-6)
    # the pinned allocator rounds each block up to a power of two
    odd = memory.estimate(LLAMA_8B, **{**kw, "max_length": 100_000}, offload_layers=1)
    assert odd.host_bytes == 2**30 > 100_000 * 4096 * 2
    # the host must hold it: 120 offloaded GiB do not fit 75% of 128 GiB
    many = memory.estimate(LLAMA_8B, **{**kw, "max_length": 131072 * 4, "device_memory_bytes": 10**15},
                           offload_layers=30, host_memory_bytes=H200_HOST)
    assert many.host_bytes == 120 * GiB and not many.host_fits and many.fits is False
    with pytest.raises(ResourceError, match="host's 128.00 GiB"):
        memory.check_fits(many)


# ----------------------------------------------------------------------------- the plan

def _plan(max_length: int, budget: int = H200, host: int = H200_HOST, off=frozenset(), dropout: float = 0.0):
    spec = TrainingSpec(base_model="x", quantization="nf4", adapter={"r": 16, "dropout": dropout},
                        hyperparameters={"batch_size": 1, "max_length": max_length})
    kw = speed.estimate_kwargs(spec)  # the fused LM head, bf16 QLoRA (no config given: Liger's kernels not counted)

    def est(ck, **long):
        return memory.estimate(LLAMA_8B, **{**dict(micro_batch=1, max_length=max_length, quantization="nf4",
                                                   r=16, gradient_checkpointing=ck, device_memory_bytes=budget,
                                                   host_memory_bytes=host, **kw), **long})

    sp = speed.plan(spec, LLAMA_8B, "cuda", True, gradient_checkpointing=True, auto_checkpointing=True,
                    budget_bytes=budget, estimate=est, max_length=max_length, off=off)
    return sp, est


def _fits(e) -> bool:
    return bool(e.fits)


def test_plan_on_an_h200_16k_and_128k_need_only_checkpointing():
    for length in (16384, 131072):
        sp, est = _plan(length)
        assert not sp.on("offload") and not sp.on("tiled_mlp") and sp.longest_length is None
        assert 0 < sp.checkpointed_layers <= 32 and sp.memory_estimate_bytes <= memory.HEADROOM * H200
        assert "not needed" in sp.reasons["offload"]
    assert _plan(131072)[0].checkpointed_layers > _plan(16384)[0].checkpointed_layers


def test_plan_on_an_h200_256k_offloads_the_fewest_layers_that_fit():
    sp, est = _plan(262144)
    k = sp.offload_layers
    assert sp.checkpointed_layers == 32 and 0 < k < 32 and not sp.on("tiled_mlp")
    assert sp.host_bytes == k * 2 * GiB  # 256k x 4096 x bf16 = 2 GiB per layer
    assert _fits(est(True, offload_layers=k)) and not _fits(est(True, offload_layers=k - 1))
    assert "pinned host memory" in sp.reasons["offload"] and "offload" in sp.summary()


def test_plan_on_an_h200_384k_needs_the_tiled_mlp_and_512k_is_refused():
    sp, est = _plan(393216)
    assert sp.on("offload") and sp.on("tiled_mlp") and sp.mlp_tile_tokens == memory.MLP_TILE_TOKENS
    assert _fits(est(True, offload_layers=sp.offload_layers, tiled_mlp=True))
    assert not _fits(est(True, offload_layers=32))  # offload alone would not do
    # 512k: every layer offloaded with the tiled MLP still exceeds the card, whatever the host holds
    refused, est = _plan(524288, host=1024 * GiB)
    assert not refused.on("offload") and not refused.on("tiled_mlp")
    assert refused.longest_length == 262144
    assert "not enough even with activation offload and tiled MLP" in refused.reasons["offload"]
    assert not _fits(est(True, offload_layers=32, tiled_mlp=True))
    # adapter dropout: the tiled MLP would draw other masks than the untiled run, so the plan does not use it
    drop, _ = _plan(393216, dropout=0.05)
    assert not drop.on("tiled_mlp") and "adapter.dropout=0" in drop.reasons["tiled_mlp"]


def test_plan_on_a_24_gib_card():
    budget, host = 24 * GiB, 64 * GiB
    assert not _plan(16384, budget, host)[0].on("offload")
    sp, est = _plan(32768, budget, host)
    assert sp.on("offload") and sp.checkpointed_layers == 32
    refused, est = _plan(65536, budget, host)
    assert refused.longest_length == 32768 and refused.memory_estimate_bytes is None
    # "-offload": only the tiled MLP is left, which alone does not fit 32k here
    no_off, _ = _plan(32768, budget, host, off=frozenset({"offload"}))
    assert not no_off.on("offload") and no_off.reasons["offload"] == speed.OFF_BY
    assert no_off.longest_length == 16384


def test_a_length_that_nothing_fits_is_refused_with_the_longest_that_does(monkeypatch):
    from tunekit.backends.local import resolve
    from tunekit.backends.local.peft_config import DeviceInfo

    monkeypatch.setattr(resolve, "device_info", lambda device: DeviceInfo("cuda", H200, "H200"))
    monkeypatch.setattr(resolve, "host_memory_bytes", lambda: H200_HOST)
    spec = TrainingSpec(base_model="x", quantization="nf4", adapter={"r": 16, "dropout": 0.0},
                        hyperparameters={"batch_size": 1, "max_length": 1 << 20})
    r = resolve.resolve_run(spec, model_config=LLAMA_8B)
    assert r.estimate.fits is False and r.speed.longest_length == 262144
    with pytest.raises(ResourceError) as e:
        memory.check_fits(r.estimate)
    assert e.value.hint.startswith("set hyperparameters.max_length to 262144 or less")
    assert "activation offload and tiled MLP" in e.value.hint
    # the suggested length trains: its own plan fits, with the long-context means it needs
    ok = resolve.resolve_run(spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(
        update={"max_length": 262144})}), model_config=LLAMA_8B)
    assert ok.estimate.fits and ok.speed.longest_length is None
    # a planned run fitting only with them records them, and its fit check is theirs
    assert ok.speed.on("offload") and ok.estimate.host_bytes == ok.speed.host_bytes > 0


def test_cpu_plans_leave_long_context_off(tiny_model):
    from tunekit.backends.local.resolve import resolve_run

    spec = TrainingSpec(base_model=str(tiny_model), hyperparameters={"max_length": 64})
    sp = resolve_run(spec, device="cpu").speed
    assert not sp.on("offload") and not sp.on("tiled_mlp") and sp.offload_layers == sp.mlp_tile_tokens == 0
    assert "offload" in speed.OPTIMISATIONS and "tiled_mlp" in speed.OPTIMISATIONS


# ----------------------------------------------------------------------------- train() with both forced on

def _rows(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Q{i}: " + "x" * (i % 5), "response": f" A{i % 4}" + "y" * (3 + i % 7)} for i in range(16)]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.slow
def test_train_with_offload_and_tiled_mlp_forced_on_learns_the_same(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from tunekit.backends.local.run import run_for_files
    from tunekit.backends.local.train import train

    lr, steps = 5e-3, 4
    spec = TrainingSpec(base_model=str(tiny_model), quantization="none",
                        hyperparameters={"batch_size": 4, "learning_rate": lr, "max_length": 64, "warmup_ratio": 0.0},
                        adapter={"r": 8, "alpha": 16, "dropout": 0.0})
    data = _rows(tmp_path)

    def arm(name: str, long: bool):
        run = run_for_files(spec, data, tmp_path / name, max_steps=steps, device="cpu", gradient_checkpointing=True,
                            packing=False)
        if long:  # forced: a CPU plan never picks them
            run = run.model_copy(update={"speed": {**run.speed, "offload_layers": 2, "mlp_tile_tokens": 16}})
        cb = Recorder()
        out = train(run, cb)
        return out, cb

    plain, cb_plain = arm("plain", False)
    long, cb_long = arm("long", True)
    applied = long.extra["speed"]["applied"]
    assert applied["offloaded_layers"] == 2 and applied["tiled_mlp_modules"] == 2
    assert "offloaded_layers" not in plain.extra["speed"]["applied"]
    tokens = 4 * 64
    eps = rounding_eps("float32", tokens)
    assert len(cb_long.losses()) == len(cb_plain.losses()) == steps
    assert_close(cb_long.losses(), cb_plain.losses(), eps, what="losses")
    ta = load_file(str(Path(long.adapter_path) / "adapter_model.safetensors"))
    tb = load_file(str(Path(plain.adapter_path) / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert_close(ta[k], tb[k], eps, scale=adam_scale([lr] * steps, ta[k].numel()), what=k)


# ----------------------------------------------------------------------------- CUDA only

def test_offload_uses_pinned_memory_and_tiled_mlp_matches_on_cuda(tiny_model):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("pinned host memory and the CUDA copies need a GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (1, 96), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def arm(off: bool, tile: int):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda()
        m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, 0, 0.1)
        m.train()
        base = m.get_base_model()
        kernels.set_checkpointing(base, 2)
        stats = longctx.offload_checkpointed_inputs(base, 2)[1] if off else None
        if tile:
            longctx.tile_mlps(base, tile)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}, stats

    ref_loss, ref, _ = arm(False, 0)
    loss, got, stats = arm(True, 0)
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    # one tensor moved per offloaded layer, its input hidden state (bf16), and every one brought back
    assert (stats.tensors, stats.restored, stats.bytes) == (2, 2, 2 * ids.numel() * hidden * 2), stats
    assert torch.equal(loss, ref_loss) and all(torch.equal(got[k], ref[k]) for k in ref)
    loss, got, _ = arm(True, 32)
    eps = rounding_eps("bfloat16", ids.numel())
    assert_close(loss.cpu(), ref_loss.cpu(), eps, what="loss")
    for k in ref:
        assert_close(got[k].cpu(), ref[k].cpu(), eps, what=k)


# ----------------------------------------------------------------------------- attention masks (padded, packed rows)

def _sdpa_calls(model, monkeypatch, **inputs):
    """(mask bytes, key elements, value elements, query heads) of the first SDPA call of one forward."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        mask = kw.get("attn_mask")
        seen.append((0 if mask is None else mask.numel() * mask.element_size(), k.numel(), v.numel(), q.shape[1]))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(**inputs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    return seen[0]


def test_mask_term_is_the_mask_transformers_builds(tiny_model, monkeypatch):
    """attention.py's terms against the tensors transformers' sdpa path really builds, at S = 512 on the tiny
    (grouped-KV) Llama: padded rows get a [rows, 1, S, S] bool mask and K/V repeated to every query head; a packed
    micro-batch (TRL's padding-free collator: one row of all its tokens) a [1, 1, T, T] one; one row none."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunekit.backends.local.attention import attention_mask_shape, attention_terms
    from tunekit.backends.local.memory import _dims

    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    m.config.use_cache = False
    m.train()
    d = _dims(m.config.to_dict())
    S, hd = 512, d["head_dim"]

    def terms(micro, kind):
        return attention_terms(d, micro, S, kind, False, cdt=4, layer_bytes=4, score_bytes=4)

    # padded: two rows, the second shorter
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, S // 3:] = 0
    got, k, v, heads = _sdpa_calls(m, monkeypatch, input_ids=torch.randint(0, 200, (2, S)), attention_mask=mask)
    assert attention_mask_shape(2, S, "padded") == (2, S)
    assert got == terms(2, "padded")["mask"] == 2 * S * S
    # the K/V copies the term keeps per layer: every query head instead of the KV heads
    assert heads == d["heads"] > d["kv_heads"]
    copies = (k + v - 2 * 2 * d["kv_heads"] * S * hd) * 4
    bias = 2 * S * S * 4  # S is a multiple of SDPA_BIAS_ALIGN: the bias is as wide as the mask
    assert terms(2, "padded")["saved"] == bias + copies > bias
    # packed: two sequences of S tokens through TRL's padding-free collator
    rows = [{"input_ids": [1 + i % 199 for i in range(S)]}, {"input_ids": [1 + i % 97 for i in range(S)]}]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert batch["input_ids"].shape == (1, 2 * S)
    got, *_ = _sdpa_calls(m, monkeypatch, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    assert got == terms(2, "packed")["mask"] == (2 * S) ** 2
    # one row: no mask, no term; "padded" with one row is that case (the micro-batch of 1)
    got, k, v, heads = _sdpa_calls(m, monkeypatch, input_ids=torch.randint(0, 200, (1, S)))
    assert got == 0 and k == v == d["kv_heads"] * S * hd
    assert terms(1, "padded") == {"kind": "none", "mask": 0, "saved": 0, "transient": 0}
    assert attention_mask_shape(1, S, "padded", method="dpo") == (2, S)  # chosen + rejected: padded


def _plan_on_h200(monkeypatch, max_length: int, batch_size: int, packing):
    from tunekit.backends.local import resolve
    from tunekit.backends.local.peft_config import DeviceInfo

    monkeypatch.setattr(resolve, "device_info", lambda device: DeviceInfo("cuda", H200, "H200"))
    monkeypatch.setattr(resolve, "host_memory_bytes", lambda: H200_HOST)
    spec = TrainingSpec(base_model="x", quantization="nf4", adapter={"r": 16, "dropout": 0.0},
                        hyperparameters={"batch_size": batch_size, "max_length": max_length})
    return resolve.resolve_run(spec, model_config=LLAMA_8B, packing=packing)


def test_packing_at_long_lengths_is_decided_from_its_mask(monkeypatch):
    """Where packed rows keep sdpa's mask (a torch without varlen_attn): at 131,072 tokens a packed micro-batch's
    mask (16 GiB of bool, 32 GiB of SDPA's bf16 bias per layer computing, 16 GiB while converting it) does not fit
    one H200 where the unpacked row does: 'auto' does not pack (and says why), true is refused on
    provider_options.local.packing. At 2048 x 4, 'auto' is left to the rows, and the fit check counts the packed
    mask."""
    from tunekit._exceptions import ConfigError
    from tunekit.backends.local import varlen

    monkeypatch.setattr(varlen, "kernel", lambda: None)
    auto = _plan_on_h200(monkeypatch, 131072, 1, "auto")
    assert auto.packing is False and auto.packing_reason.startswith("auto: not packed: the packed micro-batch's")
    assert "does not fit (unpacked it does)" in auto.packing_reason
    assert auto.estimate.fits and auto.estimate.assumptions["attention_mask"] == "none"  # one unpadded row
    assert auto.estimate_kwargs["attention_mask"] == "padded"
    with pytest.raises(ConfigError) as e:
        _plan_on_h200(monkeypatch, 131072, 1, True)
    assert e.value.field == "provider_options.local.packing"
    assert "packing to false" in e.value.hint and "max_length" in e.value.hint
    assert _plan_on_h200(monkeypatch, 131072, 1, False).packing is False
    short = _plan_on_h200(monkeypatch, 2048, 4, "auto")
    assert short.packing is None and short.estimate.assumptions["attention_mask"] == "packed"
    assert short.estimate.fits and _plan_on_h200(monkeypatch, 2048, 4, True).packing is True


@pytest.mark.parametrize("gqa", [False, True])
def test_packed_rows_through_varlen_are_planned_without_a_mask(monkeypatch, gqa):
    """Where train() runs packed rows through varlen flash attention (CUDA, a covered model, varlen_attn in torch),
    the plan counts no mask: at 131,072 tokens packing fits and 'auto' is left to the rows. What the kernel keeps
    beyond flash's terms is the K/V repeated to every query head when it takes no grouped heads (torch 2.11), and
    the estimate counts exactly that per layer not checkpointed."""
    from tunekit.backends.local import attention, varlen

    params = frozenset({"window_size", "enable_gqa"} if gqa else {"window_size"})
    monkeypatch.setattr(varlen, "kernel", lambda: (None, params))
    kind = "varlen_gqa" if gqa else "varlen"
    assert varlen.packed_attention("cuda", "llama") == kind
    assert varlen.packed_attention("cpu", "llama") == varlen.packed_attention("cuda", "gpt2") == "packed"
    assert varlen.packed_attention("cuda", "llama", frozenset({"varlen_attention"})) == "packed"  # switched off
    auto = _plan_on_h200(monkeypatch, 131072, 1, "auto")
    assert auto.packing is None and auto.estimate.assumptions["attention_mask"] == kind
    assert auto.estimate.fits and _plan_on_h200(monkeypatch, 131072, 1, True).packing is True
    d = memory._dims(LLAMA_8B)
    kw = dict(cdt=2, layer_bytes=2, score_bytes=2)
    copies = 4 * 2048 * 2 * (d["heads"] - d["kv_heads"]) * d["head_dim"] * 2
    assert attention.attention_terms(d, 4, 2048, kind, False, **kw) == {
        "kind": kind, "mask": 0, "saved": 0 if gqa else copies, "transient": 0}
    kw = dict(micro_batch=4, max_length=2048, quantization="nf4", r=16, gradient_checkpointing=False,
              kbit_upcast=False, device_memory_bytes=H200)  # bf16 layers (tunekit's QLoRA on a GPU): 2 bytes
    none, var = (memory.estimate(LLAMA_8B, **kw, attention_mask=k) for k in ("none", kind))
    assert var.breakdown["activations"] - none.breakdown["activations"] == d["layers"] * (0 if gqa else copies)


def test_auto_does_not_pack_when_the_mask_takes_a_large_share():
    """The share rule alone: a packed plan that fits but whose attention is over PACK_MASK_SHARE of the budget."""
    from tunekit.backends.local.resolve import PACK_MASK_SHARE, packing_decision

    kw = dict(micro_batch=1, max_length=98304, quantization="nf4", r=16, fused_lm_head=True, kbit_upcast=False,
              device_memory_bytes=120 * GiB)
    packed = memory.estimate(LLAMA_8B, **kw, attention_mask="packed")
    unpacked = memory.estimate(LLAMA_8B, **kw, attention_mask="padded")
    assert packed.fits and packed.assumptions["attention_bytes"] > PACK_MASK_SHARE * 120 * GiB
    on, why = packing_decision("sft", "auto", memory=(packed, unpacked))
    assert on is False and f"more than {PACK_MASK_SHARE:.0%}" in why
    assert packing_decision("sft", True, memory=(packed, unpacked)) == (True, "requested")  # asked for, and fits


def test_the_micro_batch_suggested_at_long_lengths_counts_the_padding_mask():
    """Two padded rows of 65,536 tokens: the estimate counts their mask (and the bf16 bias and K/V copies of the
    computing layer) and no longer fits an 80 GiB budget; the micro-batch it suggests is 1, where there is no mask."""
    kw = dict(max_length=65536, quantization="nf4", r=16, fused_lm_head=True, kbit_upcast=False, fused_kernels=True,
              device_memory_bytes=80 * GiB)
    padded = memory.estimate(LLAMA_8B, micro_batch=2, **kw, attention_mask="padded")
    bare = memory.estimate(LLAMA_8B, micro_batch=2, **kw)
    assert bare.fits and padded.fits is False
    assert padded.total_bytes - bare.total_bytes > 2 * 65536**2  # at least the bool mask
    assert any(s.startswith("lower the micro-batch to 1 ") for s in padded.suggestions)
    one = memory.estimate(LLAMA_8B, micro_batch=1, **kw, attention_mask="padded")
    assert one.fits and one.total_bytes == memory.estimate(LLAMA_8B, micro_batch=1, **kw).total_bytes


def test_the_refusal_hint_names_the_means_tried_and_what_dropout_blocks():
    sp, _ = _plan(524288)
    assert sp.longest_length_hint == ("set hyperparameters.max_length to 262144 or less: the longest power-of-two "
                                      "length that fits this device with activation offload and tiled MLP")
    drop, _ = _plan(524288, dropout=0.05)  # the tiled MLP is not tried with dropout: the hint says how to allow it
    assert "with activation offload;" in drop.longest_length_hint
    assert drop.longest_length_hint.endswith("adapter.dropout=0 would allow the tiled MLP")
    bare, _ = _plan(524288, off=frozenset({"offload", "tiled_mlp"}))
    assert "with every layer checkpointed" in bare.longest_length_hint and "dropout" not in bare.longest_length_hint
    assert _plan(131072)[0].longest_length_hint == ""  # it fits: no hint
