"""recompute.py: a layer not checkpointed recomputes its two RMSNorm outputs in backward instead of keeping them:
the same loss and gradients, bit for bit, and exactly two [tokens, hidden] tensors less kept per layer; on the
layers `recompute_mlp` names, the MLP's gate/up outputs as well (two [tokens, intermediate] less)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from tunekit.backends.local import kernels, memory, recompute, speed  # noqa: E402


def _model(tiny_model, quant: str = "none"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, device_map={"": "cpu"}, **kw)
    m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian",
                                     lora_dropout=0.0))
    kernels.patch_lora(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return m


def _step(m, ids, monkeypatch):
    """Loss, gradients, and the bytes of the distinct tensors autograd kept (the weights left out). Inside a hooked
    layer recompute.py's hooks are the innermost (they win over this test's): what they keep is counted there."""
    import torch

    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    held = []  # what recompute.py's hooks returned: a tensor kept until the forward ends may become a recipe
    real = recompute._pack
    monkeypatch.setattr(recompute, "_pack", lambda made, t: held.append(real(made, t)) or held[-1])
    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(input_ids=ids, labels=ids).loss
    for h in held:
        pack(getattr(h, "tensor", h))
    loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, \
        sum(v for k, v in storages.items() if k not in weights)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_recomputed_norms_give_the_same_gradients_and_keep_less(tiny_model, quant, monkeypatch):
    import torch

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_grads, ref_kept = _step(_model(tiny_model, quant), ids, monkeypatch)
    m = _model(tiny_model, quant)
    layers = len(m.base_model.model.model.layers)
    assert recompute.recompute_norms(m.get_base_model()) == layers
    assert recompute.recompute_norms(m.get_base_model()) == 0  # once
    calls = []
    for layer in m.base_model.model.model.layers:  # the norms run once in forward and once more in backward
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    loss, grads, kept = _step(m, ids, monkeypatch)
    assert calls.count(True) == calls.count(False) == 2 * layers
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    assert ref_kept - kept == layers * 2 * ids.numel() * hidden * 4  # two fp32 [tokens, hidden] per layer


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_recomputed_mlp_gives_the_same_gradients_and_keeps_less(tiny_model, quant, monkeypatch):
    """On the named layers the gate/up outputs (the SwiGLU's inputs) are computed again in backward from the
    recomputed normed state: bit for bit the same, and two [tokens, intermediate] less per such layer."""
    import torch

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = _model(tiny_model, quant)
    recompute.recompute_norms(ref.get_base_model())
    ref_loss, ref_grads, ref_kept = _step(ref, ids, monkeypatch)
    m = _model(tiny_model, quant)
    base = m.get_base_model()
    layers = base.model.layers
    recompute.recompute_norms(base)
    assert recompute.recompute_mlp(base, range(1, len(layers))) == len(layers) - 1  # all but the first
    assert recompute.recompute_mlp(base, [1]) == 0  # once
    calls = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.register_forward_hook(lambda *a, i=i: calls[i].append(torch.is_grad_enabled()))
    loss, grads, kept = _step(m, ids, monkeypatch)
    assert calls[0] == [True, True]  # not named: forward only
    assert all(sorted(calls[i]) == [False, False, True, True] for i in range(1, len(layers)))
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    inter = json.loads((tiny_model / "config.json").read_text())["intermediate_size"]
    assert ref_kept - kept == (len(layers) - 1) * 2 * ids.numel() * inter * 4


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_offloaded_mlp_outputs_come_back_the_same(tiny_model, monkeypatch, device):
    """offload_mlp: the gate/up outputs of the named layers go to pinned host memory on a side stream and come back
    one layer ahead in backward: bit for bit the same gradients, nothing recomputed for them, and the same bytes
    less kept on the GPU as recomputing. A copy past the host budget recomputes instead; on CPU (no streams, host
    memory is the device's) every layer recomputes."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA streams and pinned memory (the GPU machine runs this case)")
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5)).to(device)
    ref = _model(tiny_model).to(device)
    recompute.recompute_norms(ref.get_base_model())
    ref_loss, ref_grads, ref_kept = _step(ref, ids, monkeypatch)

    def run(budget):
        m = _model(tiny_model).to(device)
        base = m.get_base_model()
        layers = base.model.layers
        recompute.recompute_norms(base)
        assert recompute.recompute_mlp(base, range(len(layers)), offload=range(len(layers)),
                                       host_budget=budget) == len(layers)
        again, sent = [], set()  # outputs recomputed; layers that sent one to the host
        real_send = recompute._send
        monkeypatch.setattr(recompute, "_send", lambda state, m: real_send(state, m) or (
            sent.add(state.index) if m.host is not None else None))
        for layer in layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.register_forward_hook(lambda *a: again.append(1) if not torch.is_grad_enabled() else None)
        loss, grads, kept = _step(m, ids, monkeypatch)
        assert torch.equal(loss, ref_loss)
        for n, g in ref_grads.items():
            assert torch.equal(grads[n], g), n
        return len(sent), len(again), kept, len(layers)

    inter = json.loads((tiny_model / "config.json").read_text())["intermediate_size"]
    one = ids.numel() * inter * 4  # one fp32 [tokens, intermediate]
    sent, recomputed, kept, layers = run(budget=1 << 40)
    assert ref_kept - kept == layers * 2 * one  # what leaves the GPU: the same as recomputing
    if device == "cpu":
        assert (sent, recomputed) == (0, 2 * layers)
    else:
        assert (sent, recomputed) == (layers, 0)
        # room for three of the outputs: the first layer and half of the second go, the rest is recomputed
        sent, recomputed, kept, _ = run(budget=3 * one)
        assert (sent, recomputed) == (2, 2 * layers - 3) and ref_kept - kept == layers * 2 * one
        # pinning refused (a container's limit): that output and every later one are recomputed, nothing fails
        real, calls = torch.empty, []

        def empty(*a, **k):
            if k.get("pin_memory") and len(calls) >= 1:
                raise RuntimeError("CUDA error: out of memory (pinned)")
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(torch, "empty", empty)
        sent, recomputed, _, _ = run(budget=1 << 40)
        monkeypatch.setattr(torch, "empty", real)
        assert (sent, recomputed) == (1, 2 * layers - 1)


def test_host_memory_is_the_containers_limit_where_lower(tmp_path, monkeypatch):
    """The offloads pin a share of the host memory the process may use: a cgroup limit below the physical memory
    wins; "max" (no limit) and missing files leave the physical memory."""
    from tunekit.backends.local import resolve

    phys = resolve.host_memory_bytes()
    assert phys and phys > 0
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    monkeypatch.setattr(resolve, "CGROUP_LIMITS", (str(v2), str(v1)))
    assert resolve.host_memory_bytes() == phys  # neither file
    v2.write_text("max\n")
    v1.write_text(str(phys * 4) + "\n")  # v1's "no limit" is a huge number
    assert resolve.host_memory_bytes() == phys
    v1.write_text(str(2 << 30) + "\n")
    assert resolve.host_memory_bytes() == 2 << 30


def test_checkpointed_layers_and_no_grad_run_unhooked(tiny_model, monkeypatch):
    """A checkpointed layer keeps its input alone (the hooks stay out of it: the same saved bytes as without);
    without grad nothing is recorded."""
    import torch

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = _model(tiny_model)
    layers = len(ref.base_model.model.model.layers)
    kernels.set_checkpointing(ref.get_base_model(), layers)
    ref_loss, ref_grads, ref_kept = _step(ref, ids, monkeypatch)
    m = _model(tiny_model)
    kernels.set_checkpointing(m.get_base_model(), layers)
    recompute.recompute_norms(m.get_base_model())
    loss, grads, kept = _step(m, ids, monkeypatch)
    assert kept == ref_kept and torch.equal(loss, ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_the_plan_and_the_estimate_count_it():
    cfg = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, model_type="llama")
    kw = dict(micro_batch=4, max_length=2048, r=16, quantization="nf4", fused_lm_head=True, kbit_upcast=False,
              fused_kernels=True)

    def acts(**more):
        return memory._estimate(cfg, **{**kw, **more}).breakdown["activations"]

    # kept layers: two bf16 [tokens, hidden] less each, one computed again on top in a layer's backward; the layer
    # recomputed under checkpointing keeps them (only that transient is added)
    one = 4 * 2048 * 4096 * 2
    assert acts(gradient_checkpointing=False) - acts(gradient_checkpointing=False, recompute_norms=True) == \
        (32 * 2 - 1) * one
    assert acts(gradient_checkpointing=True, recompute_norms=True) - acts(gradient_checkpointing=True) == one
    assert acts(gradient_checkpointing=False, lora_dropout=0.05) == \
        acts(gradient_checkpointing=False, lora_dropout=0.05, recompute_norms=True)  # dropout keeps copies instead
    assert "recompute_norms" in speed.OPTIMISATIONS
    spec = type("S", (), {"method": "sft", "adapter": type("A", (), {"dropout": 0.0})()})()
    assert speed.estimate_kwargs(spec, cfg, "cuda")["recompute_norms"] is True
    assert speed.estimate_kwargs(spec, cfg, "cuda", frozenset({"recompute_norms"}))["recompute_norms"] is False


def test_the_plan_mixes_checkpointed_mlp_recomputing_and_kept_layers():
    """recompute_mlp: the estimate of every layer recomputing its gate/up outputs keeps two [tokens, intermediate]
    less per layer (plus the first such layer's transient); the plan takes the least recompute that fits, so at the
    8B shape and 20 GiB it recomputes MLPs instead of checkpointing layers, and its peak stays within the budget."""
    cfg = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, model_type="llama")
    budget = 20 * memory.GiB
    kw = dict(micro_batch=4, max_length=2048, r=16, quantization="nf4", fused_lm_head=True, kbit_upcast=False,
              fused_kernels=True, fused_mlp=True, recompute_norms=True, device_memory_bytes=budget)

    def est(ck, **more):
        return memory.estimate(cfg, **{**kw, "gradient_checkpointing": ck, **more})

    tokens, two_i = 4 * 2048, 2 * 14336 * 2  # bf16
    none, mlp, full = est(False), est(False, recompute_mlp=True), est(True)
    assert mlp.assumptions["recompute_mlp"] and mlp.assumptions["recompute_mlp_bytes"] == tokens * two_i
    assert none.breakdown["activations"] - mlp.breakdown["activations"] == (32 - 1) * tokens * two_i
    assert est(False, recompute_mlp=True, lora_dropout=0.05).assumptions["recompute_mlp"] is False
    assert est(True, recompute_mlp=True).total_bytes == full.total_bytes  # checkpointed layers keep their input
    peak = memory.kept_layers_peak
    assert peak(full, none, 32, 0, mlp=mlp, mlp_layers=32) == mlp.total_bytes
    assert peak(full, none, 32, 0, mlp=mlp, mlp_layers=0) == full.total_bytes
    assert peak(full, none, 32, 32, mlp=mlp, mlp_layers=5) == none.total_bytes  # all kept: none left to recompute
    steps = [peak(full, none, 32, 4, mlp=mlp, mlp_layers=m) for m in range(29)]
    assert all(a < b for a, b in zip(steps, steps[1:]))  # each one keeps more than a checkpointed layer
    # one MLP layer and the rest checkpointed: the first recompute, after that layer freed its activations, is the peak
    assert peak(full, none, 32, 0, mlp=mlp, mlp_layers=1) == \
        int(full.total_bytes - full.assumptions["layer_input_bytes"] * (1 + memory.FRAGMENTATION))

    spec = type("S", (), {"method": "sft", "adapter": type("A", (), {"dropout": 0.0, "use_dora": False,
                                                                   "variant": "lora"})()})()
    from tunekit.schemas.spec import TrainingSpec

    spec = TrainingSpec(base_model="x", quantization="nf4", adapter={"r": 16, "dropout": 0.0},
                        hyperparameters={"batch_size": 4, "max_length": 2048})
    args = dict(gradient_checkpointing=True, auto_checkpointing=True, budget_bytes=budget, estimate=est,
                max_length=2048)
    on = speed.plan(spec, cfg, "cuda", True, **args)
    off = speed.plan(spec, cfg, "cuda", True, off=frozenset({"recompute_mlp"}), **args)
    assert off.mlp_recompute_layers == 0 and not off.on("recompute_mlp") and 0 < off.checkpointed_layers < 32
    assert on.on("recompute_mlp") and on.mlp_recompute_layers > 0 and "MLP's gate/up" in on.reasons["checkpointing"]
    assert on.on("offload_mlp") and not off.on("offload_mlp") and off.reasons["offload_mlp"] == "needs recompute_mlp"
    no_offload = speed.plan(spec, cfg, "cuda", True, off=frozenset({"offload_mlp"}), **args)
    assert not no_offload.on("offload_mlp") and no_offload.mlp_recompute_layers == on.mlp_recompute_layers
    share = speed._mlp_share(cfg, 2048)
    assert 0.45 < share < 0.55  # gate and up: 2 x 4096 x 14336 of ~218M weights per layer, and attention
    cost = on.checkpointed_layers + share * on.mlp_recompute_layers
    assert cost < off.checkpointed_layers
    keep = 32 - on.checkpointed_layers - on.mlp_recompute_layers
    assert on.memory_estimate_bytes == peak(full, none, 32, keep, mlp=mlp, mlp_layers=on.mlp_recompute_layers)
    assert on.memory_estimate_bytes <= memory.HEADROOM * budget
    # nothing cheaper fits: each (kept, MLP) mix with less recompute is over the budget
    for k in range(33):
        for m in range(33 - k):
            if (32 - k - m) + share * m < cost - 1e-9:
                assert peak(full, none, 32, k, mlp=mlp, mlp_layers=m) > memory.HEADROOM * budget, (k, m)


def test_the_offloaded_layers_are_spread_over_the_mlp_layers(monkeypatch):
    """kernels.apply offloads as many MLP layers as recompute.offload_share measures (given the layer's shape: 8B,
    ~218M linear weights per layer), spread evenly over the MLP-recomputing layers after the checkpointed ones."""
    import types

    import torch
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8)
    base = types.SimpleNamespace(config=cfg, parameters=lambda: iter([types.SimpleNamespace(is_cuda=True,
                                                                                            device="cuda:0")]))
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(recompute, "offload_share", lambda *a: asked.append(a) or 5)
    sp = speed.SpeedPlan(enabled={}, reasons={}, num_layers=32, checkpointed_layers=2, mlp_recompute_layers=10)
    assert kernels._offload_mlp_layers(base, sp) == [2, 4, 6, 8, 10]
    assert asked == [(32, 4096, 14336, 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336, "cuda:0")]
    monkeypatch.setattr(recompute, "offload_share", lambda *a: 40)  # never more than the MLP layers
    assert kernels._offload_mlp_layers(base, sp) == list(range(2, 12))


def test_the_offload_budget_is_this_ranks_share_of_the_host(monkeypatch):
    """The ranks of a node share its memory: each may pin its share of HOST_SHARE of it, less the long-context
    offload's pinned bytes (which the plan counts per rank)."""
    from tunekit.backends.local import resolve

    monkeypatch.setattr(resolve, "host_memory_bytes", lambda: 100 << 30)
    sp = speed.SpeedPlan(enabled={}, reasons={}, num_layers=32, checkpointed_layers=0, host_bytes=5 << 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert kernels._host_budget(sp) == int(memory.HOST_SHARE * (100 << 30)) - (5 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert kernels._host_budget(sp) == int(memory.HOST_SHARE * (100 << 30)) // 4 - (5 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert kernels._host_budget(sp) == 0  # never negative
