"""speed.py + kernels.py: each optimisation trains to the same loss/adapter as the path without it (tiny Llama, CPU).

Liger's kernels are Triton (CUDA only): their test is skipped without a GPU; on the GPU,
benchmarks/train_throughput.py --check-loss compares the whole fast path with the plain recipe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tunekit._exceptions import ConfigError  # noqa: E402
from tunekit.backends.local import kernels, memory, nf4, speed  # noqa: E402
from tests.train_recorder import train_files as train  # noqa: E402
from tunekit.schemas.spec import TrainingSpec  # noqa: E402
from tests.tolerance import (adam_scale, assert_close, bound, mixed_eps, rel_diff, rounding_eps,  # noqa: E402
                             unit_roundoff)
from tests.train_recorder import Recorder  # noqa: E402

GiB = 2**30
# the CPU cases pin their models there: on a GPU machine transformers/bitsandbytes would place them on cuda:0
CPU = {"": "cpu"}
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, model_type="llama")


LR, BATCH, MAX_LENGTH, STEPS = 5e-3, 4, 64, 6
# the longest reduction of a training step: a weight gradient sums over every token of the batch
TOKENS = BATCH * MAX_LENGTH
FP32 = rounding_eps("float32", TOKENS)
# QLoRA on CPU computes in bf16: where two paths differ by fp32 rounding, bf16 roundings flip (tests/tolerance.py)
FP32_THROUGH_BF16 = mixed_eps("float32", "bfloat16", TOKENS)


def spec_for(model: Path, **kw) -> TrainingSpec:
    hp = {"batch_size": BATCH, "learning_rate": LR, "max_length": MAX_LENGTH, "warmup_ratio": 0.0, "epochs": 2,
          **kw.pop("hp", {})}
    adapter = {"r": 8, "alpha": 16, "dropout": 0.1, **kw.pop("adapter", {})}
    return TrainingSpec(base_model=str(model), hyperparameters=hp, adapter=adapter, **kw)


def rows_file(tmp_path: Path, n: int = 16) -> Path:
    # varied lengths, so batches carry padding
    rows = [{"prompt": f"Q{i}: " + "x" * (i % 5), "response": f" A{i % 4}" + "y" * (i % 7)} for i in range(n)]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def run(tmp_path: Path, name: str, spec: TrainingSpec, speedups: str, **kw):
    cb = Recorder()
    off = [p for p in speedups.split(",") if p] or "auto"  # provider_options.local.speedups
    kw.setdefault("device", "cpu")  # a GPU machine too: these compare CPU runs to fp32 rounding
    out = train(spec, rows_file(tmp_path), tmp_path / name, callbacks=cb, max_steps=STEPS, speedups=off, **kw)
    return out, cb


def adapter_tensors(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out.adapter_path) / "adapter_model.safetensors"))


def assert_same_training(a, b, eps: float) -> None:
    """Two runs that compute the same steps with relative rounding error ``eps``: the losses agree to it, and
    each adapter tensor to what Adam makes of a gradient error eps (tests/tolerance.py: at most lr per element
    per step, so the scale is LR * STEPS * sqrt(numel), known before the run)."""
    (out_a, cb_a), (out_b, cb_b) = a, b
    assert len(cb_a.losses()) == len(cb_b.losses()) == STEPS
    assert_close(cb_a.losses(), cb_b.losses(), eps, what="losses")
    ta, tb = adapter_tensors(out_a), adapter_tensors(out_b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert_close(ta[k], tb[k], eps, scale=adam_scale([LR] * STEPS, ta[k].numel()), what=k)
    # training moved the adapter: equal adapters are not two untouched initialisations
    assert any(float(t.abs().max()) > 0 for k, t in ta.items() if "lora_B" in k)


# ----------------------------------------------------------------------------- equal loss, one optimisation at a time

@pytest.mark.slow
def test_fast_lora_trains_like_peft(tiny_model, tmp_path):
    spec = spec_for(tiny_model, quantization="none")
    fast = run(tmp_path, "fast", spec, "")
    slow = run(tmp_path, "peft", spec, "-fast_lora")
    sp = fast[0].extra["speed"]
    assert sp["enabled"]["fast_lora"] and sp["applied"]["fast_lora_modules"] == 2 * 7  # 2 layers x all-linear
    assert not slow[0].extra["speed"]["enabled"]["fast_lora"]
    assert_same_training(fast, slow, FP32)  # dropout 0.1 too: same RNG draws in the same order


@pytest.mark.slow
@pytest.mark.parametrize("quant,dropout", [("none", 0.0), ("none", 0.1), ("nf4", 0.0)])
def test_fast_dora_trains_like_peft(tiny_model, tmp_path, quant, dropout):
    # dropout 0: the fused LoRA+DoRA forward; 0.1: the cached-norm DoRA layer. nf4: bitsandbytes' optimizer
    # updates the adapter without bumping version counters, so a norm cached across steps would go stale.
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    spec = spec_for(tiny_model, quantization=quant, adapter={"use_dora": True, "dropout": dropout})
    fast = run(tmp_path, "fast", spec, "")
    slow = run(tmp_path, "peft", spec, "-fast_dora,-fast_lora")
    assert fast[0].extra["speed"]["applied"]["fast_dora_modules"] == 14
    assert "fast_dora_modules" not in slow[0].extra["speed"]["applied"]
    # the norm is the same sum in another order: fp32 rounding; with NF4 the compute is bf16, whose roundings
    # that fp32 difference flips
    assert_same_training(fast, slow, FP32_THROUGH_BF16 if quant == "nf4" else FP32)


@pytest.mark.slow
def test_bf16_kbit_qlora_trains_like_prepare_model_for_kbit_training(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    spec = spec_for(tiny_model, quantization="nf4", adapter={"dropout": 0.0})
    fast = run(tmp_path, "fast", spec, "")
    slow = run(tmp_path, "peft", spec, "-bf16_kbit,-fast_lora")
    assert fast[0].extra["base_linear_class"] == "Linear4bit"
    assert fast[0].extra["speed"]["enabled"]["bf16_kbit"] and not slow[0].extra["speed"]["enabled"]["bf16_kbit"]
    assert_same_training(fast, slow, FP32)  # the same bf16 roundings on both paths: only fp32 order differs


@pytest.mark.slow
def test_qlora_adapters_stay_fp32(tiny_model, tmp_path):
    """TRL casts a quantized model's adapters to bf16; fp32_adapters puts them back (PEFT's default)."""
    import torch

    pytest.importorskip("bitsandbytes")
    spec = spec_for(tiny_model, quantization="nf4", adapter={"dropout": 0.0})
    kept = run(tmp_path, "fp32", spec, "")
    trl = run(tmp_path, "bf16", spec, "-fp32_adapters")
    assert kept[0].extra["speed"]["applied"]["fp32_adapter_params"] == 2 * 7 * 2
    assert {t.dtype for t in adapter_tensors(kept[0]).values()} == {torch.float32}
    assert {t.dtype for t in adapter_tensors(trl[0]).values()} == {torch.bfloat16}


@pytest.mark.slow
def test_checkpointing_all_some_or_no_layers_gives_the_same_training(tiny_model, tmp_path):
    spec = spec_for(tiny_model, quantization="none")
    none = run(tmp_path, "none", spec, "", gradient_checkpointing=False)
    full = run(tmp_path, "all", spec, "", gradient_checkpointing=True)
    assert none[0].extra["speed"]["checkpointed_layers"] == 0 and not none[0].gradient_checkpointing
    assert full[0].extra["speed"]["applied"]["checkpointed_layers"] == 2 and full[0].gradient_checkpointing
    assert_same_training(none, full, FP32)


@pytest.mark.slow
def test_partial_checkpointing_gives_the_same_gradients(tiny_model):
    """The per-layer policy (first k layers checkpointed) leaves gradients unchanged, whatever k."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for k in (0, 1, 2):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, device_map=CPU),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        model.train()
        assert kernels.set_checkpointing(model.get_base_model(), k) == k
        layers = model.get_base_model().model.layers
        assert [bool(layer.gradient_checkpointing) for layer in layers] == [i < k for i in range(2)]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    eps = rounding_eps("float32", ids.numel())  # the recompute repeats the same fp32 pass
    for g in grads[1:]:
        for n in grads[0]:
            assert_close(g[n], grads[0][n], eps, what=n)


# ----------------------------------------------------------------------------- the pieces, directly

def test_dora_norm_matches_the_direct_norm_once_per_forward_pass():
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(48, 32, bias=False)
    A = torch.nn.Parameter(torch.randn(4, 48, generator=g))
    B = torch.nn.Parameter(torch.randn(32, 4, generator=g))
    layer = DoraLinearLayer(fan_in_fan_out=False)
    direct = torch.linalg.norm(base.weight + 0.5 * (B @ A), dim=1)
    got = kernels.dora_weight_norm(layer, base, A, B, 0.5)
    eps = rounding_eps("float32", 48)  # fp32 sums of 48 squares (the expansion's terms too)
    assert_close(got, direct.detach(), eps)
    assert kernels.dora_weight_norm(layer, base, A, B, 0.5) is not got  # no pass counter: never cached
    state = kernels.FastState(passes=1)
    got = kernels.dora_weight_norm(layer, base, A, B, 0.5, state)
    assert kernels.dora_weight_norm(layer, base, A, B, 0.5, state) is got  # the same pass (the checkpoint recompute)
    with torch.no_grad():
        B.data.add_(1.0)  # like a bitsandbytes optimizer kernel: no version bump
    state.passes += 1  # the next forward pass
    again = kernels.dora_weight_norm(layer, base, A, B, 0.5, state)
    assert_close(again, torch.linalg.norm(base.weight + 0.5 * (B @ A), dim=1).detach(), eps)


@pytest.mark.parametrize("dora,compute,dropout", [(False, "fp32", 0.0), (False, "fp32", 0.1), (True, "fp32", 0.0),
                                                  (False, "bf16", 0.0), (True, "bf16", 0.0)])
def test_fused_forward_equals_peft_forward_on_nf4(tiny_model, monkeypatch, dora, compute, dropout):
    """Linear4bit (bitsandbytes NF4 on CPU): the NF4 LoRA function (with dropout: the same masks), and with
    DoRA (no dropout) m/n folded into the block scales with the norms of all layers batched per pass, give
    PEFT's loss and adapter gradients (DoRA's magnitude included), also on a second pass after the adapter
    moved. fp32 compute checks the algebra to rounding; bf16 compute under autocast (the GPU recipe) checks
    the dtype handling, to bf16 rounding. (train() on CPU computes QLoRA in bf16 without autocast, which
    this function leaves to the generic path.)"""
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(2 if dora else 1))
    extra = {"use_dora": True} if dora else {}
    applied, passes = [], []
    real, real_pass = nf4.lora_forward, nf4._compute_pass
    monkeypatch.setattr(nf4, "lora_forward", lambda *a: applied.append(real(*a)) or applied[-1])
    monkeypatch.setattr(nf4, "_compute_pass", lambda layers, *a: passes.append(len(layers)) or real_pass(layers, *a))
    from tunekit.backends.local import dora_triton

    kernel_calls = []  # dora_triton's kernel where Triton runs (its CPU interpreter here): checked against PEFT
    real_grad = dora_triton.magnitude_grad
    monkeypatch.setattr(dora_triton, "magnitude_grad",
                        lambda g, *a: kernel_calls.append(dora_triton.available(g.device)) or real_grad(g, *a))

    def arm(fast: bool, compute: str):
        cdt = torch.bfloat16 if compute == "bf16" else torch.float32
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=cdt)
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, quantization_config=q, device_map=CPU)
        m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                         lora_dropout=dropout, **extra))
        if fast:
            state = kernels.FastState(fuse_dora=dora)
            assert kernels.patch_lora(m, state) == 14
            if dora:
                kernels.track_forward_passes(m, state)  # DoRA values of all 14 layers computed together, once per pass
        m.train()
        for step in range(2):  # between the passes every adapter weight moves in place (as bnb's optimizer
            if step:           # does, without version bumps): the second pass must not reuse the first's norms
                with torch.no_grad():
                    for p in m.parameters():
                        if p.requires_grad:
                            p.add_(0.005 * torch.sign(p.grad) + 0.001)
                            p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone().float() for n, p in m.named_parameters() if p.requires_grad}

    peft_loss, peft_grads = arm(False, compute)
    fast_loss, fast_grads = arm(True, compute)
    assert len(applied) == 2 * 14 and all(o is not None for o in applied)  # the NF4 function ran in every layer
    assert passes == ([14, 14] if dora else [])  # one batched computation per forward pass
    assert len(kernel_calls) == (2 * 14 if dora else 0)  # every DoRA layer's backward, twice
    assert not dora or all(kernel_calls) == dora_triton.available(ids.device)
    assert any("magnitude" in n for n in peft_grads) == dora and peft_grads.keys() == fast_grads.keys()
    # the longest reductions: the MLP's width (forward) and the tokens (weight gradients)
    n_reduce = max(ids.numel(), json.loads((tiny_model / "config.json").read_text())["intermediate_size"])
    if compute == "fp32":
        eps = rounding_eps("float32", n_reduce)
        assert_close(fast_loss, peft_loss, eps, what="loss")
        for n, g in peft_grads.items():
            assert_close(fast_grads[n], g, eps, what=n)
        return
    # bf16: both round, at different points. Against the fp32-compute PEFT reference each is within bf16's
    # bound, and tunekit's error must be of the size of PEFT's own: it rounds at most once more per operation
    # (DoRA's output is rounded to bf16, where PEFT's stays fp32 in this fp32-model test), so at most twice
    # PEFT's error plus one bf16 rounding per tensor. A wrong term would be off by ~100%.
    eps = rounding_eps("bfloat16", n_reduce)
    ref_loss, ref_grads = arm(False, "fp32")
    assert_close(fast_loss, ref_loss, eps / n_reduce**0.5, what="loss")  # a mean of the tokens' losses: the
    # per-token errors average out, leaving about one rounding of the result
    err_fast = [rel_diff(fast_grads[n], ref) for n, ref in ref_grads.items()]
    err_peft = [rel_diff(peft_grads[n], ref) for n, ref in ref_grads.items()]
    assert max(err_fast) <= bound(eps, 1.0), max(err_fast)
    assert sum(err_fast) <= 2 * sum(err_peft) + unit_roundoff("bfloat16") * len(err_fast), (sum(err_fast),
                                                                                           sum(err_peft))



@pytest.fixture
def liger_undone(monkeypatch):
    """Liger's patching also replaces transformers' Llama RoPE function and RMSNorm/MLP classes for the whole
    process (its Triton kernels): put them back after the test, so later CPU cases build stock Llamas."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


def test_liger_kernels_patch_the_model_and_train_on_cuda(tiny_model, liger_undone):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("Liger's kernels are Triton (CUDA only); the GPU benchmark's --check-loss covers them")
    pytest.importorskip("liger_kernel")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for liger in (False, True):
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda()
        m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear"))
        sp = speed.SpeedPlan({"liger": liger}, {}, 2, 0)
        kernels.apply(m, sp)
        with torch.no_grad():
            losses.append(float(m(input_ids=ids, labels=ids).loss))
    # fp32 both ways (Liger's fused cross-entropy sums the vocabulary in chunks): fp32 rounding of that sum
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert_close(losses[1], losses[0], rounding_eps("float32", vocab), what="loss")


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_the_fast_paths_set_nothing_on_peft_modules_but_their_forward(tiny_model, quant):
    """The pass counter, the cached norms and the 4-bit DoRA values live in the model's FastState, not as
    attributes of PEFT's and bitsandbytes' modules; each patched module only gets its new forward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, device_map=CPU, **kw)
    m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, use_dora=True))
    before = {name: set(vars(mod)) for name, mod in m.named_modules()}
    done = kernels.apply(m, speed.SpeedPlan({"fast_lora": True, "fast_dora": True}, {}, 2, 0))
    assert done["fast_lora_modules"] == done["fast_dora_modules"] == 14
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    m.train()
    for _ in range(2):
        m(input_ids=ids, labels=ids).loss.backward()
    # (gradient_checkpointing: transformers' own switch of each decoder layer, which set_checkpointing sets)
    added = {name: set(vars(mod)) - before[name] - {"gradient_checkpointing"} for name, mod in m.named_modules()}
    assert {a for keys in added.values() for a in keys} == {"forward"}
    assert sum("forward" in keys for keys in added.values()) == 28  # 14 LoRA layers and their 14 DoRA layers


def test_plan_checkpoints_only_the_layers_the_budget_needs():
    spec = TrainingSpec(base_model="x", quantization="nf4", hyperparameters={"batch_size": 4, "max_length": 2048},
                        adapter={"r": 16})

    def est(ck, **more):
        return memory.estimate(LLAMA_8B, micro_batch=4, max_length=2048, quantization="nf4", r=16,
                               gradient_checkpointing=ck, **{**speed.estimate_kwargs(spec), **more})

    full, none = est(True).total_bytes, est(False).total_bytes
    kw = dict(gradient_checkpointing=True, auto_checkpointing=True, estimate=est)
    roomy = speed.plan(spec, LLAMA_8B, "cuda", True, budget_bytes=int(none / memory.HEADROOM) + GiB, **kw)
    tight = speed.plan(spec, LLAMA_8B, "cuda", True, budget_bytes=int(full / memory.HEADROOM) + 1, **kw)
    middle = speed.plan(spec, LLAMA_8B, "cuda", True, budget_bytes=20 * GiB, **kw)
    assert roomy.checkpointed_layers == 0 and "not needed" in roomy.reasons["checkpointing"]
    # where all-checkpointed just fits, so does keeping the last layer: its activations are freed before the
    # first recompute, which the all-checkpointed estimate counts (memory.kept_layers_peak)
    assert tight.checkpointed_layers == 31 and tight.memory_estimate_bytes <= full
    over = speed.plan(spec, LLAMA_8B, "cuda", True, budget_bytes=int(full / memory.HEADROOM) - GiB, **kw)
    assert over.checkpointed_layers == 32 and "still exceeds" in over.reasons["checkpointing"]
    assert 0 < middle.checkpointed_layers < 32
    assert middle.memory_estimate_bytes <= memory.HEADROOM * 20 * GiB
    # the caller forcing it wins; CPU runs default to none
    forced = speed.plan(spec, LLAMA_8B, "cuda", True, budget_bytes=200 * GiB, gradient_checkpointing=True,
                        auto_checkpointing=False, estimate=est)
    assert forced.checkpointed_layers == 32
    cpu = speed.plan(spec, LLAMA_8B, "cpu", True, budget_bytes=None, gradient_checkpointing=False,
                     auto_checkpointing=True)
    assert cpu.checkpointed_layers == 0 and not cpu.on("liger") and "CUDA" in cpu.reasons["liger"]


def test_rows_of_one_length_get_the_split_without_an_attention_mask(monkeypatch):
    """Unpacked rows are planned as padded (a mask; the rows are not tokenized yet). The plan also records the
    split for rows that all have one length (no padding, so no mask: less kept per layer), which the worker takes
    once it has tokenized them (SpeedPlan.for_unpadded): less recompute, within the same budget."""
    from tunekit.backends.local import resolve
    from tunekit.backends.local.peft_config import DeviceInfo

    monkeypatch.setattr(resolve, "device_info", lambda device: DeviceInfo("cuda", 139 * GiB, "H200"))
    real = speed.estimate_kwargs
    monkeypatch.setattr(speed, "estimate_kwargs", lambda *a, **k: {**real(*a, **k), "fused_kernels": True,
                                                                  "fused_mlp": True})  # the H200 path
    spec = TrainingSpec(base_model="x", quantization="nf4", adapter={"r": 16, "dropout": 0.0},
                        hyperparameters={"batch_size": 4, "max_length": 2048})
    sp = resolve.resolve_run(spec, model_config=LLAMA_8B, memory_budget_bytes=20 * GiB).speed
    assert sp.unpadded is not None
    one = sp.for_unpadded()
    assert one.unpadded is None and one.for_unpadded() is one
    assert "rows of one length" in one.reasons["checkpointing"] and one.summary() != sp.summary()
    share = speed._mlp_share(LLAMA_8B, 2048)

    def cost(p):
        return p.checkpointed_layers + share * p.mlp_recompute_layers

    assert cost(one) < cost(sp) and one.memory_estimate_bytes <= memory.HEADROOM * 20 * GiB
    assert one.on("checkpointing") == (one.checkpointed_layers > 0)
    assert one.on("recompute_mlp") == (one.mlp_recompute_layers > 0)
    # stored with the run and read back (LocalRun.speed is the dict); a run stored before these fields reads too
    assert speed.SpeedPlan(**sp.to_dict()).for_unpadded() == one
    older = {k: v for k, v in sp.to_dict().items() if k not in ("mlp_recompute_layers", "unpadded")}
    assert speed.SpeedPlan(**older).for_unpadded().mlp_recompute_layers == 0
    packed = resolve.resolve_run(spec, model_config=LLAMA_8B, memory_budget_bytes=20 * GiB, packing=True).speed
    assert packed.unpadded is None  # packed rows: varlen attention, no mask either way


@pytest.mark.slow
def test_the_worker_takes_the_unpadded_split_for_rows_of_one_length(tiny_model, tmp_path):
    """train() takes SpeedPlan.unpadded once the tokenized rows all have one length, says so in its events and
    trains the same (here 1 of 2 layers checkpointed and the other recomputing its MLP, on CPU: exact); rows of
    several lengths keep the planned split."""
    from tunekit.backends.local.run import run_for_files
    from tunekit.backends.local.train import train as train_run

    spec = spec_for(tiny_model, quantization="none", adapter={"dropout": 0.0})
    same = tmp_path / "same.jsonl"  # one length: one digit per row where the numbers vary
    same.write_text("".join(json.dumps({"prompt": f"Q{i % 10}: xx", "response": f" A{i % 7}yy"}) + "\n"
                            for i in range(16)))

    def go(name, data, unpadded):
        cb = Recorder()
        r = run_for_files(spec, data, tmp_path / name, max_steps=STEPS, speedups="auto", device="cpu",
                          packing=False)
        assert r.speed["checkpointed_layers"] == 0 and r.speed["unpadded"] is None  # CPU: no budget split
        r.speed["unpadded"] = unpadded
        return train_run(r, cb), cb

    split = {"checkpointed_layers": 1, "mlp_recompute_layers": 1, "memory_estimate_bytes": 1 << 30,
             "reason": "1 of 2 layers (rows of one length: no attention mask)", "recompute_mlp": "1 layer",
             "offload_mlp": False}
    taken = go("taken", same, split)
    plain = go("plain", same, None)
    said = [m for _, m in taken[1].events if m.startswith("every row has")]
    assert len(said) == 1 and "rows of one length" in said[0] and "MLP recomputed in 1" in said[0]
    applied = taken[0].extra["speed"]["applied"]
    assert applied["checkpointed_layers"] == 1 and applied["recompute_mlp_layers"] == 1
    assert_same_training(taken, plain, FP32)
    mixed = go("mixed", rows_file(tmp_path), split)
    assert not any(m.startswith("every row has") for _, m in mixed[1].events)
    assert mixed[0].extra["speed"]["applied"].get("checkpointed_layers", 0) == 0


def test_estimate_for_the_fast_path_drops_the_logits_and_the_fp32_upcast():
    kw = dict(micro_batch=4, max_length=2048, quantization="nf4", r=16, gradient_checkpointing=True)
    plain = memory.estimate(LLAMA_8B, **kw)
    fast = memory.estimate(LLAMA_8B, **kw, fused_lm_head=True, kbit_upcast=False)
    # the plain recipe's calibration point (27.3 GiB allocated, measured) is unchanged by default
    allocated = plain.total_bytes - plain.breakdown["overhead"]
    assert 26 * GiB < allocated < 28.5 * GiB
    saved = plain.total_bytes - fast.total_bytes
    logits = 4 * 2048 * 128256 * 12  # the B x S x V logits and their fp32 companions
    assert saved > logits  # plus the bf16 embeddings/head and the bf16 residual stream
    assert fast.breakdown["weights"] < plain.breakdown["weights"]
    assert fast.total_bytes < 20 * GiB


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_plan_says_when_dora_dropout_costs_a_second_base_matmul(tiny_model, dropout):
    from tunekit.backends.local.resolve import resolve_run

    spec = spec_for(tiny_model, quantization="none", adapter={"use_dora": True, "dropout": dropout})
    sp = resolve_run(spec, device="cpu").speed
    assert bool(sp.notes) == (dropout > 0)
    if dropout:
        assert "adapter.dropout=0" in sp.notes[0] and sp.notes[0] in sp.summary()


def test_speedups_are_an_option_recorded_with_the_run(tiny_model):
    from typing import get_args

    from tunekit.backends.local.backend import LocalBackend
    from tunekit.backends.local.options import SpeedupOff

    assert {o.lstrip("-") for o in get_args(SpeedupOff)} == set(speed.OPTIMISATIONS)
    assert speed.disabled("off") == set(speed.OPTIMISATIONS) and speed.disabled("auto") == set()
    assert speed.disabled(["-liger", "-fast_dora"]) == {"liger", "fast_dora"}

    def planned(value):
        spec = spec_for(tiny_model, provider_options={"local": {"device": "cpu", "speedups": value}})
        return LocalBackend().plan(spec).request

    req = planned(["-fast_lora"])
    assert req["options"]["speedups"] == ["-fast_lora"]  # the run carries it: a resumed worker uses the same
    assert req["speed"]["enabled"]["fast_lora"] is False
    assert req["speed"]["reasons"]["fast_lora"] == "disabled by provider_options.local.speedups"
    assert planned("auto")["speed"]["enabled"]["fast_lora"] is True
    with pytest.raises(ConfigError) as e:
        planned(["-warp_drive"])
    assert e.value.field == "provider_options.local.speedups" and "-fast_dora" in str(e.value)


UPDATE_REL = 1e-3  # the update's size relative to the base output (rms): far below bf16's ulp


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dora", [False, True])
def test_nf4_forward_rounds_base_plus_update_once(tiny_model, monkeypatch, dora, device):
    """The first LoRA updates are far below half a bf16 ulp of the base output (B ~ 1e-4 after one step). The
    4-bit function rounds base + s B A x once, so the update survives on average; adding it to an already
    rounded base output (PEFT's bf16 add, a GEMM epilogue: cuBLAS rounds before adding C) kept about half of
    it here, and the loss lagged the plain recipe's (which adds in fp32) for the first steps."""
    pytest.importorskip("bitsandbytes")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA: cuBLAS's epilogue is what this case checks (scripts/gpu_tests.sh runs it)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, quantization_config=q,
                                             device_map={"": 0} if device == "cuda" else CPU)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["down_proj"], lora_dropout=0.0,
                                     use_dora=dora))
    kernels.patch_lora(m, kernels.FastState(fuse_dora=dora))
    layer = m.base_model.model.model.layers[0].mlp.down_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # a bf16 residual stream, as train() runs QLoRA on a GPU (bf16_kbit)
    x = torch.randn(4096, A.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16().to(device)
    calls = []
    monkeypatch.setattr(nf4, "lora_forward", lambda *a, real=nf4.lora_forward: calls.append(real(*a)) or calls[-1])

    def out() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16 and calls[-1] is y  # through the 4-bit function
        return y.double()

    base = out()  # B = 0 at init: the base output alone (DoRA: m/n = 1)
    with torch.no_grad():
        B.copy_(torch.randn(B.shape, generator=torch.Generator().manual_seed(1)).to(device))
        upd = 2.0 * (x.float() @ A.t()) @ B.t()  # s B A x in fp32, before its relative size is set
        k = UPDATE_REL * base.float().pow(2).mean().sqrt() / upd.pow(2).mean().sqrt()
        B.mul_(k)
        upd = (upd * k).double()
        if dora:  # m = ||W|| (its init) stays: the output is (m/n) (base + update), n = ||W + s B A||
            layer.lora_magnitude_vector["default"].weight.copy_(kernels.dora_weight_norm(
                layer.lora_magnitude_vector["default"], layer.get_base_layer(), A, B, 2.0))
    kept = float(((out() - base) * upd).sum() / upd.pow(2).sum())
    # Rounding b + d with d far below an ulp is unbiased: kept = 1 up to the rounding noise of the two outputs,
    # each off by up to u|b| (uniform: std u|b|/sqrt(3)), averaged over the outputs. A lost half is 0.5.
    spread = math.sqrt(2 / 3) * unit_roundoff("bfloat16") / UPDATE_REL / math.sqrt(base.numel())
    assert abs(kept - 1) <= bound(spread, 1.0), (kept, spread)


@pytest.mark.parametrize("dora", [True, False])
def test_liger_with_4bit_dora_gives_peft_gradients_on_cuda(tiny_model, dora, liger_undone):
    """Liger's RoPE rotates the q/k outputs in place and its SwiGLU writes the gate/up gradients over the gate/up
    outputs; the 4-bit DoRA function saves its outputs for the magnitude's gradient (kernels.guard_dora_outputs
    keeps them apart). With the real kernels every gradient is PEFT's DoRA without Liger, to fp32 rounding (an
    overwritten output is off by O(1); tests/test_local_dora_inplace.py has the CPU stand-ins). The down
    projections take the SwiGLU's inputs (kernels.fuse_swiglu_down, Liger's kernels): also for LoRA."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("Liger's kernels are Triton (CUDA only); tests/test_local_dora_inplace.py emulates them on CPU")
    pytest.importorskip("liger_kernel")
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.randint(0, 200, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads, done = [], {}
    for liger in (False, True):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, quantization_config=q,
                                                 device_map={"": 0})
        m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                         lora_dropout=0.0, use_dora=dora))
        if liger:
            done = kernels.apply(m, speed.SpeedPlan({"liger": True, "fast_lora": True, "fast_dora": dora}, {}, 2, 0))
        if not dora:  # B off its zero init (both arms alike), so every gradient term is exercised
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(4))
        m.train()
        with torch.no_grad():  # magnitudes off their init, so m/n - 1 is not ~0
            for n, p in m.named_parameters():
                if "magnitude" in n:
                    p.mul_(1.0 + 0.1 * torch.rand(p.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(3)))
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float().cpu() for n, p in m.named_parameters() if p.requires_grad})
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert done["fused_swiglu_down"] == layers, done
    assert not dora or (done["dora_copied_outputs"] == 2 * layers and done["dora_swiglu_keeping_inputs"] == layers)
    n_reduce = max(ids.numel(), json.loads((tiny_model / "config.json").read_text())["intermediate_size"])
    for n, g in grads[0].items():
        assert_close(grads[1][n], g, rounding_eps("float32", n_reduce), what=n)


def test_cudnn_sdpa_is_off_while_lengths_vary_and_restored_after():
    """Padded (or packed) batches of mixed lengths change shape between steps; cuDNN's SDPA plans every new shape
    (0.1-1.8 s on an H200, benchmarks/attention_shapes.py), so a GPU run of varying lengths trains without it. The
    process-wide switch is put back afterwards, also when training fails; CPU runs and one-length data leave it."""
    import torch

    from tunekit.backends.local.kernels import sdpa_for_lengths

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_for_lengths(True, [12, 40, 40, 7]) as off:
        assert off and not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with sdpa_for_lengths(True, []):  # DPO keeps no lengths: its pairs vary
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            raise RuntimeError("boom")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for on_gpu, lengths in ((True, [64, 64, 64]), (False, [12, 40])):
        with sdpa_for_lengths(on_gpu, lengths) as off:
            assert not off and torch.backends.cuda.cudnn_sdp_enabled()
