"""tunekit export: LoRA adapter GGUF and merged-model GGUF read back with gguf's reader, the Ollama folder, refusals.

Tolerances are the output type's rounding: f16 keeps 11 significant bits (relative error <= 2^-11), bf16 8
(<= 2^-8), Q8_0 rounds each block of 32 to a multiple of absmax/127 (error <= half a step, plus the f16 scale).
A merged model is also rounded once to its 16-bit checkpoint dtype (base cast + sum: two roundings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from tests.conftest_serve import make_adapter  # noqa: E402
from tunekit import ConfigError  # noqa: E402
from tunekit.cli.main import main  # noqa: E402
from tunekit.export import export_model  # noqa: E402

# llama.cpp's names for the Llama modules (written out here, not taken from the code under test)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
UNIT_ROUNDOFF = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8}
N_HEAD, N_KV = 4, 2  # build_tiny_llama's defaults


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("ad") / "lora", r=8, target_modules="all-linear",
                        b_std=0.01, seed=3)


def interleave(rows, n_head):
    """llama.cpp's rotary row order: in each head, rows (0, d/2, 1, d/2+1, ...) of Hugging Face's half-split."""
    d = rows.shape[0] // n_head
    order = [h * d + i // 2 + (i % 2) * (d // 2) for h in range(n_head) for i in range(d)]
    return rows[order]


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(t):
    """A GGUF tensor as float32 with numpy's (rows, cols) shape."""
    import numpy as np

    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        tuple(reversed([int(x) for x in t.shape])))


def assert_close(got, ref, outtype, earlier=0.0):
    """Within the outtype's rounding of ``ref``, plus ``earlier``: the bound of roundings before the export."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float32)
    assert got.shape == ref.shape
    if got.ndim == 1:  # 1-D tensors are written as F32
        tol = np.zeros_like(ref)
    elif outtype == "q8_0" and ref.shape[-1] % 32 == 0:
        blocks = (np.abs(ref) + earlier).reshape(*ref.shape[:-1], -1, 32).max(-1, keepdims=True)
        step = np.broadcast_to(blocks / 127, (*blocks.shape[:-1], 32)).reshape(ref.shape)
        tol = step * (0.5 + 127 * 2.0 ** -11)
    else:  # f16/bf16, and the F16 fallback of a Q8_0 matrix whose rows do not split into blocks
        u = UNIT_ROUNDOFF.get(outtype, 2.0 ** -11)
        tol = u * (np.abs(ref) + earlier) + (2.0 ** -24 if u == 2.0 ** -11 else 0.0)  # f16 subnormal step
    err = np.abs(got - ref)
    tol = (tol + earlier) * 1.0001 + 1e-9
    assert (err <= tol).all(), f"max error {err.max():.3g} over tolerance (worst excess {(err - tol).max():.3g})"


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_adapter_gguf_has_every_lora_tensor_in_llama_cpp_layout(adapter, tmp_path, outtype):
    from safetensors.torch import load_file

    out = tmp_path / "a.gguf"
    res = export_model(adapter, out, outtype=outtype)
    assert res.files == {"adapter": str(out)} and res.architecture == "llama"
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 16.0  # PEFT lora_alpha = 2r
    assert fields["tunekit.lora.rank"] == 8

    peft = load_file(str(adapter / "adapter_model.safetensors"))
    expected = {}
    for key, t in peft.items():
        layer = int(key.split(".layers.")[1].split(".")[0])
        module = next(m for m in GGUF_NAMES if f".{m}." in key)
        part = "lora_a" if ".lora_A." in key else "lora_b"
        if part == "lora_b" and module.endswith("q_proj"):
            t = interleave(t, N_HEAD)
        elif part == "lora_b" and module.endswith("k_proj"):
            t = interleave(t, N_KV)
        expected[f"blk.{layer}.{GGUF_NAMES[module]}.weight.{part}"] = t.float().numpy()
    assert set(tensors) == set(expected) and len(expected) == 2 * 7 * 2
    for name, ref in expected.items():
        t = tensors[name]
        assert [int(x) for x in t.shape] == list(reversed(ref.shape))  # GGUF lists dims innermost first
        assert values(t).shape[0] == (8 if name.endswith("lora_a") else ref.shape[0])  # rank from lora_a
        assert_close(values(t), ref, outtype)
    types = {t.tensor_type.name for t in tensors.values()}
    want = {"f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0", "F16"}}[outtype]  # rank-8 B rows: F16 fallback
    assert types == want and res.tensor_types["adapter"]["blk.0.attn_q.weight.lora_b"] == (
        "F16" if outtype == "q8_0" else outtype.upper())


def test_rslora_alpha_keeps_peft_scale(tiny_model, tmp_path):
    ad = make_adapter(tiny_model, tmp_path / "rs", r=16, use_rslora=True, lora_alpha=8)
    res = export_model(ad, tmp_path / "rs.gguf")
    fields, tensors = read(tmp_path / "rs.gguf")
    rank = values(tensors["blk.0.attn_q.weight.lora_a"]).shape[0]
    # llama.cpp scales by alpha / rank; PEFT's rsLoRA by lora_alpha / sqrt(r) = 8 / 4
    assert rank == 16 and fields["adapter.lora.alpha"] / rank == pytest.approx(8 / 16 ** 0.5)
    assert "rsLoRA" in res.notes[0]


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_merged_gguf_equals_base_plus_adapter(adapter, tiny_model, tmp_path, outtype):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    res = export_model(adapter, out, merge=True, outtype=outtype)
    assert res.files == {"model": str(out)} and res.merge_check["top1_agreement"] >= 0.99 and not res.flagged
    fields, tensors = read(out)
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == N_HEAD and fields["llama.attention.head_count_kv"] == N_KV
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.rope.dimension_count"] == 16
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert fields["tokenizer.ggml.tokens"][tok.eos_token_id] == "<|end|>"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.chat_template"] == tok.chat_template

    # the reference: every base weight, plus (alpha/r) B @ A on the adapted ones, in fp32
    base = load_file(str(tiny_model / "model.safetensors"))
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    expected, earlier = {}, {}
    u16 = UNIT_ROUNDOFF["f16" if outtype == "f16" else "bf16"]  # the merged checkpoint's dtype
    for key, w in base.items():
        w = w.float()
        w0 = w
        module = next((m for m in GGUF_NAMES if f".{m}." in key), None)
        if module is not None:
            prefix = "base_model.model." + key.removesuffix(".weight")
            w = w + 2.0 * peft[prefix + ".lora_B.weight"].float() @ peft[prefix + ".lora_A.weight"].float()
            w = interleave(w, N_HEAD) if module.endswith("q_proj") else interleave(w, N_KV) if (
                module.endswith("k_proj")) else w
            name = f"blk.{key.split('.layers.')[1].split('.')[0]}.{GGUF_NAMES[module]}.weight"
        elif ".layers." in key:
            layer, rest = key.split(".layers.")[1].split(".", 1)
            name = f"blk.{layer}." + {"input_layernorm.weight": "attn_norm.weight",
                                      "post_attention_layernorm.weight": "ffn_norm.weight"}[rest]
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        expected[name] = w.numpy()
        w0 = interleave(w0, N_HEAD) if name.endswith("attn_q.weight") else interleave(w0, N_KV) if (
            name.endswith("attn_k.weight")) else w0
        # merge_adapter casts the base to 16 bits, then rounds the sum: u|W| + u|W + BA| (+ f16 subnormal steps)
        earlier[name] = (u16 * (w0.abs() + w.abs()) + (2 * 2.0 ** -24 if outtype == "f16" else 0)).numpy()
    assert set(tensors) == set(expected)
    for name, ref in expected.items():
        assert_close(values(tensors[name]), ref, outtype, earlier=earlier[name])
    assert {tensors[n].tensor_type.name for n in tensors if n.endswith("norm.weight")} == {"F32"}


def test_ollama_folder_adapter_over_converted_base(adapter, tiny_model, tmp_path):
    out = tmp_path / "ollama"
    res = export_model(adapter, out, format="ollama", outtype="bf16")
    assert set(res.files) == {"adapter", "base", "modelfile"}
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./base.gguf" in lines and "ADAPTER ./adapter.gguf" in lines
    assert 'PARAMETER stop "<|end|>"' in lines
    base_fields, base_tensors = read(out / "base.gguf")
    adapter_fields, _ = read(out / "adapter.gguf")
    assert base_fields["general.type"] == "model" and adapter_fields["general.type"] == "adapter"
    assert "<|start|>assistant" in base_fields["tokenizer.chat_template"]  # carried over to Ollama
    from safetensors.torch import load_file

    q = load_file(str(tiny_model / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    assert_close(values(base_tensors["blk.1.attn_q.weight"]), interleave(q, N_HEAD).numpy(), "bf16")


def test_ollama_with_an_existing_base_gguf_or_merged(adapter, tmp_path):
    base = tmp_path / "llama-base.gguf"
    base.write_bytes(b"")
    res = export_model(adapter, tmp_path / "o1", format="ollama", base_gguf=base)
    assert not (tmp_path / "o1" / "base.gguf").exists()
    assert f"FROM {base.resolve()}" in (tmp_path / "o1" / "Modelfile").read_text().splitlines()
    res = export_model(adapter, tmp_path / "o2", format="ollama", merge=True, outtype="q8_0")
    lines = (tmp_path / "o2" / "Modelfile").read_text().splitlines()
    assert "FROM ./model.gguf" in lines and not any(line.startswith("ADAPTER") for line in lines)
    assert set(res.files) == {"model", "modelfile"} and not list((tmp_path / "o2").glob(".tunekit-merge-*"))
    with pytest.raises(ConfigError, match="without merge") as err:  # would be ignored: refused instead
        export_model(adapter, tmp_path / "o3", format="ollama", merge=True, base_gguf=base)
    assert err.value.field == "base_gguf" and not (tmp_path / "o3").exists()


@pytest.mark.parametrize("kwargs,field", [({"use_dora": True}, "adapter.use_dora"),
                                          ({"modules_to_save": ["lm_head"]}, "adapter.modules_to_save")])
def test_variants_llama_cpp_cannot_apply_are_refused_with_merge_as_the_way(tiny_model, tmp_path, kwargs, field):
    ad = make_adapter(tiny_model, tmp_path / "v", **kwargs)
    with pytest.raises(ConfigError) as err:
        export_model(ad, tmp_path / "v.gguf")
    assert err.value.field == field and "--merge" in err.value.hint
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))
    if "use_dora" in kwargs:  # the alternative works: DoRA folds into the merged weights
        res = export_model(ad, tmp_path / "v.gguf", merge=True)
        assert res.files["model"] == str(tmp_path / "v.gguf")


def test_unsupported_architecture_is_refused(adapter, tiny_model, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as err:
        export_model(adapter, tmp_path / "x.gguf", base_model=str(other))
    assert err.value.field == "base_model" and "convert_hf_to_gguf" in err.value.hint


def test_cli_export_and_one_line_refusal(adapter, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export", str(adapter), "--out", str(out), "--outtype", "q8_0"]) == 0
    assert f"adapter: {out}" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["export", str(adapter), "--out", str(out)]) == 2  # exists: nothing overwritten
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} exists") and "--overwrite" in err and "Traceback" not in err
    assert main(["export", str(adapter), "--out", str(out), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outtype"] == "f16"


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_qwen2_keeps_row_order_and_biases_and_ties_the_head(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunekit.testing import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    base = _save(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)), tok, tmp_path / "qwen")
    ad = make_adapter(base, tmp_path / "qad", target_modules=("q_proj", "k_proj"), b_std=0.01)
    export_model(ad, tmp_path / "a.gguf", outtype="f16")
    fields, tensors = read(tmp_path / "a.gguf")
    peft = load_file(str(ad / "adapter_model.safetensors"))
    assert fields["general.architecture"] == "qwen2" and len(tensors) == 2 * 2 * 2
    # Qwen2's rotary layout is llama.cpp's already: lora_b rows are not reordered
    b = peft["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].float().numpy()
    assert_close(values(tensors["blk.1.attn_q.weight.lora_b"]), b, "f16")

    export_model(ad, tmp_path / "m.gguf", merge=True, outtype="bf16")
    fields, tensors = read(tmp_path / "m.gguf")
    weights = load_file(str(base / "model.safetensors"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors  # tied: llama.cpp reuses token_embd
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["qwen2.attention.head_count_kv"] == 2
    bias = tensors["blk.0.attn_k.bias"]
    assert bias.tensor_type.name == "F32"  # merged checkpoint in bf16: one rounding of the bias
    ref = weights["model.layers.0.self_attn.k_proj.bias"].float().numpy()
    assert_close(values(bias), ref, "bf16", earlier=UNIT_ROUNDOFF["bf16"] * abs(ref))


def test_llama31_rope_scaling_writes_rope_factors(tmp_path):
    import math

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunekit.testing import build_tokenizer

    tok = build_tokenizer()
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    base = _save(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=rope)),
        tok, tmp_path / "l31")
    ad = make_adapter(base, tmp_path / "ad")
    export_model(ad, tmp_path / "o", format="ollama")
    fields, tensors = read(tmp_path / "o" / "base.gguf")
    assert fields["llama.rope.freq_base"] == 500000.0 and fields["llama.context_length"] == 131072
    # Llama 3.1: wavelengths shorter than 8192/4 keep factor 1, longer than 8192/1 take 8, smooth in between
    want = []
    for i in range(0, 16, 2):
        wavelen = 2 * math.pi * 500000.0 ** (i / 16)
        smooth = (8192 / wavelen - 1) / (4 - 1)
        want.append(1.0 if wavelen < 2048 else 8.0 if wavelen > 8192 else 1 / ((1 - smooth) / 8 + smooth))
    got = values(tensors["rope_freqs.weight"])
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 frequencies vs this float64 formula
    assert 1.0 < got[4] < 8.0  # the smooth band is exercised


def test_export_by_job_id_and_managed_adapters_are_refused(adapter, tmp_path):
    from tunekit.store import default_store

    store = default_store()
    job = store.create_job("local", {"base_model": "tiny"}, {})
    store.add_adapter(backend="local", location=str(adapter), info={}, job_id=job.id)
    res = export_model(job.id, tmp_path / "j.gguf")
    assert read(tmp_path / "j.gguf")[0]["general.type"] == "adapter" and res.files["adapter"].endswith("j.gguf")

    store.add_adapter(backend="together", location="acme/Meta-Llama-3.1-8B-Instruct-Reference-x", info={},
                      name="remote")
    with pytest.raises(ConfigError, match="not on this machine"):
        export_model("remote", tmp_path / "r.gguf")


def test_tokens_added_in_training_need_the_merge(tiny_model, tmp_path):
    from tunekit.testing import build_tokenizer

    ad = make_adapter(tiny_model, tmp_path / "ad")
    tok = build_tokenizer()
    tok.add_tokens(["<|tool|>"], special_tokens=True)  # the adapter's tokenizer outgrows the base embeddings
    tok.save_pretrained(ad)
    with pytest.raises(ConfigError, match="263 tokens but the model's embeddings only 262") as err:
        export_model(ad, tmp_path / "o", format="ollama")
    assert err.value.field == "tokenizer" and "--merge" in err.value.hint
    assert not list((tmp_path / "o").glob("*.gguf"))
