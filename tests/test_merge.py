"""merge_adapter: 16-bit merge (QLoRA adapters included), the logits check, refusals, registry record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.conftest_serve import make_adapter  # noqa: E402
from tests.tolerance import bound, rounding_eps, unit_roundoff  # noqa: E402
from tunekit import ConfigError  # noqa: E402
from tunekit.adapters.merge import merge_adapter, sample_prompts  # noqa: E402

PROMPTS = ["Hello there, how are you?", "def add(a, b):\n    return"]


def _logits(model, tok, prompts):
    import torch

    with torch.inference_mode():
        return [model(**tok(p, return_tensors="pt")).logits[0].float() for p in prompts]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    # a trained-sized update (small B), on all linear layers
    return make_adapter(tiny_model, tmp_path_factory.mktemp("ad") / "lora", r=8, target_modules="all-linear",
                        b_std=0.01, seed=3)


def test_merge_saves_a_16bit_checkpoint_equal_to_base_plus_adapter(adapter, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    res = merge_adapter(adapter, out, check_prompts=PROMPTS)
    assert res.dtype == "bfloat16" and res.compute_dtype == "float32" and res.device == "cpu"
    assert res.base_model == str(tiny_model) and res.prompts == PROMPTS
    assert res.notes and "float32" in res.notes[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    assert (out / "tokenizer_config.json").exists() and json.loads((out / "tunekit_merge.json").read_text())[
        "top1_agreement"] == res.top1_agreement
    assert not any(p.name.startswith("adapter_") for p in out.iterdir())  # a plain transformers checkpoint

    # Recompute the check independently from what was saved.
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base16 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).float()
    ref = _logits(PeftModel.from_pretrained(base16, adapter), tok, PROMPTS)
    got = _logits(merged, tok, PROMPTS)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).float(), tok, PROMPTS)
    diffs = [float((r - g).abs().max()) for r, g in zip(ref, got)]
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got)) / sum(len(r) for r in ref)
    assert res.positions == sum(len(r) for r in ref)
    # the same fp32 forwards computed again: each logit within fp32 rounding of the logits' size
    eps = rounding_eps("float32", merged.config.intermediate_size)
    assert abs(res.max_abs_diff - max(diffs)) <= bound(eps, max(float(r.abs().max()) for r in ref))
    assert res.top1_agreement == pytest.approx(agree)
    assert res.flagged == (res.top1_agreement < 0.99)
    # the adapter was really merged: its effect dwarfs the merge's rounding error
    effect = max(float((r - b).abs().max()) for r, b in zip(ref, base))
    assert effect > 10 * res.max_abs_diff


def test_threshold_decides_the_flag(adapter, tmp_path):
    strict = merge_adapter(adapter, tmp_path / "a", check_prompts=PROMPTS, agreement_threshold=1.01)
    assert strict.flagged and strict.agreement_threshold == 1.01
    lax = merge_adapter(adapter, tmp_path / "b", check_prompts=PROMPTS, agreement_threshold=0.0, dtype="fp16")
    assert not lax.flagged and lax.dtype == "float16"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float16"


def test_check_in_bf16_compute_is_reported(adapter, tmp_path):
    res = merge_adapter(adapter, tmp_path / "m", check_prompts=PROMPTS, compute_dtype="bf16")
    assert res.compute_dtype == "bfloat16" and not any("float32" in n for n in res.notes)


def test_qlora_adapter_is_merged_onto_the_16bit_base(tiny_model, tmp_path):
    """An adapter trained on the NF4-quantized base merges onto the base reloaded in bf16, never onto 4-bit."""
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    peft_model = get_peft_model(q, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    peft_model.save_pretrained(tmp_path / "qlora")
    res = merge_adapter(tmp_path / "qlora", tmp_path / "merged", check_prompts=PROMPTS)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert res.base_model == str(tiny_model)
    # the merge rounds each weight W + s B A to bf16 once (u16 relative): the logits move by about u16 of their
    # size per layer (the errors of the layers add), the check's reference being fp32 compute on the bf16 base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    scale = max(float(r.abs().max()) for r in _logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"),
                                                         PROMPTS))
    eps = unit_roundoff("bfloat16") * merged.config.num_hidden_layers
    assert res.max_abs_diff <= bound(eps, scale)


def test_prompts_from_training_data(adapter, tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)] + [{"prompt": "P", "completion": "C"}, {"text": "plain"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from transformers import AutoTokenizer

    got = sample_prompts(data, n=5, tokenizer=AutoTokenizer.from_pretrained(tiny_model))
    assert got[0].startswith("<s><|start|>user\nq0<|end|>") and got[3:] == ["PC", "plain"]
    res = merge_adapter(adapter, tmp_path / "m", check_data=data)
    assert len(res.prompts) == 5 and res.prompts[0] == got[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        sample_prompts(bad)


def test_refusals(adapter, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="not a PEFT adapter directory") as err:
        merge_adapter(tmp_path, tmp_path / "out")
    assert err.value.field == "adapter" and "adapter_config.json" in err.value.hint
    with pytest.raises(ConfigError, match="neither an adapter directory nor an adapter in the registry"):
        merge_adapter("no-such-adapter", tmp_path / "out")
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        merge_adapter(adapter, tmp_path / "out", dtype="int4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        merge_adapter(adapter, tmp_path / "full")
    # a pre-quantized base checkpoint is refused: merge needs the 16-bit weights
    qbase = tmp_path / "qbase"
    qbase.mkdir()
    (qbase / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ConfigError, match="pre-quantized") as err:
        merge_adapter(adapter, tmp_path / "out", base_model=str(qbase))
    assert err.value.field == "base_model"
    # an unconverted PiSSA adapter only fits the residual base
    pissa = tmp_path / "pissa"
    pissa.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    (pissa / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="unconverted"):
        merge_adapter(pissa, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_registry_adapter_gets_its_merge_check_recorded(adapter, tmp_path):
    from tunekit.store import default_store

    rec = default_store().add_adapter(backend="local", location=str(adapter), info={}, name="my-adapter")
    res = merge_adapter("my-adapter", tmp_path / "m", check_prompts=PROMPTS)
    check = default_store().get_adapter(rec.id).merge_check
    assert check["top1_agreement"] == res.top1_agreement and check["out_dir"] == str(tmp_path / "m")
    assert check["flagged"] == res.flagged


# -- the CLI: prompts from any training data, NaN flagged, disk space, nothing half-written -----------

def _merge_cli(capsys, *argv):
    from tunekit.cli.main import main

    code = main(["merge", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_merge_of_a_dpo_job_checks_on_its_preference_rows(adapter, tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tests.conftest import EXAMPLES
    from tunekit.store import default_store

    pref = EXAMPLES / "data" / "preference.jsonl"
    row = json.loads(pref.read_text().splitlines()[0])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # input messages + the preferred reply, the conversation the job was trained to prefer
    expected = tok.apply_chat_template(row["input"]["messages"] + row["preferred_output"], tokenize=False)
    assert sample_prompts(pref, n=2, tokenizer=tok)[0] == expected

    store = default_store()
    job = store.create_job("local", {"base_model": str(tiny_model), "method": "dpo"},
                           {"train": {"path": str(pref)}})
    store.add_adapter(backend="local", location=str(adapter), info={}, job_id=job.id)
    code, out, err = _merge_cli(capsys, job.id, "--out", tmp_path / "m")
    assert code == 0, err
    saved = json.loads((tmp_path / "m" / "tunekit_merge.json").read_text())
    assert saved["prompts"][0] == expected and len(saved["prompts"]) == 8


def test_a_nan_adapter_is_flagged_not_ok(adapter, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan-adapter"
    nan.mkdir()
    (nan / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.fill_(float("nan")) for k, v in weights.items()}, nan / "adapter_model.safetensors")
    code, out, _ = _merge_cli(capsys, nan, "--out", tmp_path / "m", "--threshold", "0")
    assert code == 1  # flagged even with a threshold any agreement passes
    assert "max |logit diff| nan" in out and out.splitlines()[1].endswith(": FLAGGED")
    assert "not finite" in out
    assert not (tmp_path / "m").exists()  # never saved: served as a plain base, no adapter check would run


@pytest.mark.parametrize("engine", ["embedded", "vllm"])
def test_serving_a_nan_adapter_is_refused_by_the_dry_run_too(adapter, tmp_path, capsys, engine):
    from safetensors.torch import load_file, save_file

    from tests.test_cli import assert_one_line
    from tunekit.cli.main import main

    nan = tmp_path / "nan-adapter"
    nan.mkdir()
    (nan / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = load_file(adapter / "adapter_model.safetensors")
    key = sorted(weights)[0]
    weights[key][0, 0] = float("inf")  # one value is enough to make every decoded row NaN
    save_file(weights, nan / "adapter_model.safetensors")
    code = main(["serve", str(nan), "--engine", engine, "--dry-run"])
    out = capsys.readouterr()
    assert code == 2 and "would serve" not in out.out and "vllm serve" not in out.out
    assert_one_line(out.err, f"{key} holds NaN or infinite values", "earlier checkpoint")


def test_not_enough_disk_space_is_refused_before_writing(adapter, tmp_path, capsys, monkeypatch):
    import shutil

    from tests.test_cli import assert_one_line

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))  # 10 MiB free
    code, out, err = _merge_cli(capsys, adapter, "--out", tmp_path / "m")
    assert code == 2
    assert_one_line(err, "not enough disk space", "needs about", "0.01 GiB is free")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_model_that_looks_complete(adapter, tmp_path, capsys, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    from tests.test_cli import assert_one_line

    def disk_full(self, save_directory, **kw):  # as on the H200: half the shards written, then ENOSPC
        (Path(save_directory) / "config.json").write_text("{}")
        (Path(save_directory) / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    code, _, err = _merge_cli(capsys, adapter, "--out", tmp_path / "m")
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    # the base was loaded (its progress bar is on stderr): the error is the last line
    assert_one_line(err.splitlines()[-1], "disk filled up", f"{tmp_path / 'm'}: nothing was kept")
    assert list(tmp_path.iterdir()) == []
    # --overwrite of an earlier merge: the earlier one stays whole
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_text("earlier merge")
    code, _, _ = _merge_cli(capsys, adapter, "--out", tmp_path / "m", "--overwrite")
    assert code == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("folder", ["dora", "my adapters/dora"])  # a space: the command still runs as printed
def test_the_merge_command_in_the_dora_refusal_works(tiny_model, tmp_path, capsys, folder):
    import re
    import shlex

    from tunekit.adapters.info import read_adapter
    from tunekit.serve.adapters import refuse_unservable

    dora = make_adapter(tiny_model, tmp_path / folder, r=4, b_std=0.01, use_dora=True)
    with pytest.raises(ConfigError) as err:
        refuse_unservable(read_adapter(dora), engine="vLLM")
    command = re.search(r"`(tunekit merge [^`]+)`", err.value.hint).group(1)
    argv = shlex.split(command.replace("OUT_DIR", str(tmp_path / "merged")))
    code, out, err_text = _merge_cli(capsys, *argv[2:])
    assert code == 0, err_text
    assert (tmp_path / "merged" / "config.json").is_file() and "merge check" in out


def test_merged_size_is_counted_without_loading_the_weights(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from tunekit.adapters.merge import _merged_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    params = sum(p.numel() for p in model.parameters())
    assert _merged_bytes(str(tiny_model), torch.bfloat16, 0) == 2 * params
    # an adapter tokenizer with 10 more tokens grows the untied embeddings and lm_head
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert not model.config.tie_word_embeddings
    assert _merged_bytes(str(tiny_model), torch.float16, vocab + 10) == 2 * (params + 2 * 10 * hidden)
