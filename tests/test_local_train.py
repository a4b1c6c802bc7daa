"""The local training core on a tiny random Llama, CPU: every recipe trains, saves and reloads.

Each training run is a few steps on a 2-layer, 64-wide model (about a second each after imports).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tunekit._exceptions import ConfigError, ResourceError, TrainingError  # noqa: E402
from tunekit.backends.local.train import check_finite_adapter, check_finite_step  # noqa: E402
from tunekit.schemas.spec import TrainingSpec  # noqa: E402
from tests.tolerance import assert_close, bound, rel_diff, rounding_eps, unit_roundoff  # noqa: E402
from tests.train_recorder import Recorder  # noqa: E402
from tests.train_recorder import train_files as train  # noqa: E402

pytestmark = pytest.mark.slow


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pr_rows(n: int = 32, distinct: int = 4) -> list[dict]:
    # a learnable, repeated task: the answer is a fixed function of the prompt
    return [{"prompt": f"Q{i % distinct}:", "response": f" A{i % distinct}{i % distinct}"} for i in range(n)]


def chat_rows(n: int = 8) -> list[dict]:
    return [
        {"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": "SKIPPED", "weight": 0},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": f"bye {i}"},
        ]}
        for i in range(n)
    ]


def pref_rows(n: int = 16) -> list[dict]:
    return [
        {"input": {"messages": [{"role": "user", "content": f"pick {i % 3}"}]},
         "preferred_output": [{"role": "assistant", "content": "good"}],
         "non_preferred_output": [{"role": "assistant", "content": "bad"}]}
        for i in range(n)
    ]


def make_spec(model: Path, **kw) -> TrainingSpec:
    hp = {"batch_size": 4, "learning_rate": 5e-3, "max_length": 128, "warmup_ratio": 0.0, **kw.pop("hp", {})}
    adapter = {"r": 8, "alpha": 16, **kw.pop("adapter", {})}
    return TrainingSpec(base_model=str(model), hyperparameters=hp, adapter=adapter, **kw)


@pytest.fixture
def capture_batches(monkeypatch):
    """Record each training batch (input_ids, labels) as SFTTrainer/DPOTrainer see them."""
    from trl import DPOTrainer, SFTTrainer

    seen: list[dict] = []
    for cls in (SFTTrainer, DPOTrainer):
        orig = cls.training_step

        def wrapped(self, model, inputs, *a, __orig=orig, **kw):
            seen.append({k: v.detach().clone() for k, v in inputs.items() if hasattr(v, "detach")})
            return __orig(self, model, inputs, *a, **kw)

        monkeypatch.setattr(cls, "training_step", wrapped)
    return seen


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def load_base(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ----------------------------------------------------------------------------- plain LoRA


def test_lora_sft_learns_evaluates_and_reloads(tiny_model, tmp_path):
    import torch
    from peft import PeftModel

    train_file = write_jsonl(tmp_path / "train.jsonl", pr_rows(48))
    val_file = write_jsonl(tmp_path / "val.jsonl", pr_rows(8))
    rec = Recorder()
    out = train(make_spec(tiny_model), train_file, tmp_path / "run", validation_path=val_file, callbacks=rec,
                max_steps=12, eval_steps=4)

    losses = rec.losses()
    assert rec.total == 12 and len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "epoch", "memory"):
        assert key in rec.steps[-1][1]
    assert rec.steps[-1][1]["memory"] > 0 and rec.steps[-1][1]["tokens_per_s"] > 0
    assert [s for s, _ in rec.evals] == [4, 8, 12] and math.isfinite(out.metrics["eval_loss"])
    assert out.metrics["eval_loss"] == rec.evals[-1][1]["eval_loss"]
    assert out.metrics["steps"] == 12 and out.metrics["tokens"] > 0 and not out.stopped

    assert (out.micro_batch, out.grad_accum, out.optimizer.split(" ")[0]) == (4, 1, "adamw_torch")
    assert out.quantization["mode"] == "none" and out.versions["peft"] and out.versions["trl"]
    assert out.tokenizer_sha256 and len(out.chat_template_sha256) == 64
    adapter = Path(out.adapter_path)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (adapter / "tokenizer.json").is_file()

    base = load_base(tiny_model)
    ids = torch.tensor([[5, 60, 70, 80, 90]])
    before = logits(base, ids)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(before, logits(tuned, ids))  # the trained adapter changes the model


def test_batch_size_is_global_micro_times_accumulation(tiny_model, tmp_path, capture_batches):
    f = write_jsonl(tmp_path / "t.jsonl", pr_rows(16))
    rec = Recorder()
    out = train(make_spec(tiny_model, hp={"batch_size": 4, "gradient_accumulation_steps": 2}), f,
                tmp_path / "run", max_steps=2, callbacks=rec, resume_from_checkpoint=True)
    assert (out.micro_batch, out.grad_accum) == (2, 2)
    assert out.resumed_from is None and any("no checkpoint exists" in m for _, m in rec.events)
    assert len(capture_batches) == 4 and all(b["input_ids"].shape[0] == 2 for b in capture_batches)
    with pytest.raises(ConfigError) as e:
        train(make_spec(tiny_model, hp={"batch_size": 4, "gradient_accumulation_steps": 3}), f, tmp_path / "r2")
    assert e.value.field == "hyperparameters.gradient_accumulation_steps"


# ----------------------------------------------------------------------------- loss masking


def test_completion_only_loss_on_prompt_response(tiny_model, tmp_path, capture_batches):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": "Question one?", "response": " answer one"}, {"prompt": "Q2", "completion": " two"}]
    train(make_spec(tiny_model, hp={"batch_size": 2}), write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "run",
          max_steps=1)
    batch = capture_batches[0]
    trained = sorted(tok.decode([t for t in lab.tolist() if t != -100]) for lab in batch["labels"])
    assert trained == sorted([" answer one<|end|>", " two<|end|>"])


def test_eval_loss_scores_exactly_the_tokens_training_learns(tiny_model, tmp_path, capture_batches):
    """`tunekit eval`'s held-out loss masks prompt/response rows as the trainer does (token ids, not text)."""
    from transformers import AutoTokenizer

    from tunekit.eval.loss import masked_examples

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": "Question one?", "response": " answer one"}, {"prompt": "Q2", "completion": " two"}]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    train(make_spec(tiny_model, hp={"batch_size": 2}), data, tmp_path / "run", max_steps=1)
    trained = sorted([t for t in lab.tolist() if t != -100] for lab in capture_batches[0]["labels"])
    scored = sorted([t for t, m in zip(ids[1:], mask[1:]) if m] for ids, mask in masked_examples(data, tok, 1024))
    assert scored == trained


def test_chat_loss_only_on_weighted_assistant_turns(tiny_model, tmp_path, capture_batches):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = train(make_spec(tiny_model), write_jsonl(tmp_path / "c.jsonl", chat_rows(4)), tmp_path / "run",
                max_steps=1)
    assert out.masking == "markers"
    batch = capture_batches[0]
    for ids, lab in zip(batch["input_ids"], batch["labels"]):
        trained = tok.decode([t for t in lab.tolist() if t != -100])
        full = tok.decode([t for t in ids.tolist() if t != tok.pad_token_id])
        assert "SKIPPED" in full and "be brief" in full  # in the context...
        assert trained.startswith("bye ") and trained.endswith("<|end|>")  # ...but only the weighted reply trains
        assert "SKIPPED" not in trained and "hi" not in trained and "brief" not in trained


def test_chat_masking_without_generation_markers_falls_back_or_refuses(tiny_model):
    from transformers import AutoTokenizer

    from tunekit.backends.local.datasets import chat_example, choose_chat_masking

    def trained_text(ex):
        return tok.decode([t for t, m in zip(ex["input_ids"], ex["assistant_masks"]) if m])

    msgs = chat_rows(1)[0]["messages"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with_markers = trained_text(chat_example(tok, msgs, None, *choose_chat_masking(tok)))
    assert with_markers == "bye 0<|end|>"

    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    masking, template = choose_chat_masking(tok)
    assert masking == "prefix"
    # same turn found by rendering turn by turn (jinja's trim_blocks ate the newline after the marker version)
    assert trained_text(chat_example(tok, msgs, None, masking, template)) == "bye 0<|end|>\n"

    # a template that renders earlier assistant turns differently (like reasoning templates) cannot be masked
    tok.chat_template = (
        "{% for m in messages %}<|start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[earlier]{% else %}{{ m['content'] }}{% endif %}"
        "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
    )
    with pytest.raises(ConfigError) as e:
        chat_example(tok, msgs, None, *choose_chat_masking(tok))
    assert e.value.field == "base_model" and "generation" in e.value.hint


def test_truncated_examples_are_counted(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from tunekit.backends.local.datasets import prepare

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = pr_rows(6) + [{"prompt": "long", "response": " x" * 40} for _ in range(3)]
    data = prepare(write_jsonl(tmp_path / "t.jsonl", rows), tok, method="sft", max_length=32)
    assert data.truncated_count == 3 and data.no_loss_count == 0
    rows = [{"prompt": "p" * 40, "response": " r"}]  # the prompt alone fills max_length: nothing left to learn
    data = prepare(write_jsonl(tmp_path / "p.jsonl", rows), tok, method="sft", max_length=32)
    assert (data.truncated_count, data.no_loss_count) == (1, 1)
    chat = prepare(write_jsonl(tmp_path / "c.jsonl", chat_rows(5)), tok, method="sft", max_length=40)
    assert chat.truncated_count == 5

    rec = Recorder()
    out = train(make_spec(tiny_model, hp={"max_length": 32, "batch_size": 3}), tmp_path / "t.jsonl",
                tmp_path / "run", callbacks=rec, max_steps=1)
    assert out.truncated_count == 3
    assert any(level == "warning" and "3 of 9" in msg for level, msg in rec.events)


# ----------------------------------------------------------------------------- recipes


def test_qlora_nf4_on_cpu(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    rec = Recorder()
    out = train(make_spec(tiny_model, quantization="nf4"), write_jsonl(tmp_path / "t.jsonl", pr_rows(16)),
                tmp_path / "run", callbacks=rec, max_steps=3)
    assert out.quantization["mode"] == "nf4" and out.extra["base_linear_class"] == "Linear4bit"
    # AdamW with fp32 state, as for 16-bit LoRA (resolve.optimizer_name; fused on CUDA)
    assert out.optimizer == "adamw_torch (torch.optim.adamw.AdamW)"
    assert all(math.isfinite(x) for x in rec.losses())
    PeftModel.from_pretrained(load_base(tiny_model), out.adapter_path)  # loads onto the 16/32-bit base


def test_dora_with_rslora(tiny_model, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    out = train(make_spec(tiny_model, adapter={"use_dora": True, "use_rslora": True}),
                write_jsonl(tmp_path / "t.jsonl", pr_rows(16)), tmp_path / "run", max_steps=2)
    cfg = json.loads((Path(out.adapter_path) / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    with safe_open(Path(out.adapter_path) / "adapter_model.safetensors", "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())
    model = PeftModel.from_pretrained(load_base(tiny_model), out.adapter_path)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)


@pytest.mark.parametrize("init", ["pissa", "pissa_fast"])
def test_pissa_adapter_is_converted_to_plain_lora_on_the_original_base(tiny_model, tmp_path, init):
    import torch
    from peft import PeftModel
    from transformers import set_seed

    out = train(make_spec(tiny_model, adapter={"init": init}), write_jsonl(tmp_path / "t.jsonl", pr_rows(16)),
                tmp_path / "run", max_steps=3, checkpoint_steps=3)
    cfg = json.loads((Path(out.adapter_path) / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 16 and out.lora_config["r"] == 16

    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    original = load_base(tiny_model)
    base_logits = logits(original, ids)
    converted = logits(PeftModel.from_pretrained(original, out.adapter_path), ids)
    # reference: the trained PiSSA model itself (residual base + trained adapter), rebuilt by PEFT from the
    # checkpoint; the randomized SVD of pissa_fast is reproduced by the spec's seed (as train() does on resume)
    base = load_base(tiny_model)
    set_seed(42)
    trained = logits(PeftModel.from_pretrained(base, out.last_checkpoint), ids)
    # fp32 all through: the conversion (W - B0 A0 + B A = W + B' A') and the forward round in another order
    eps = rounding_eps("float32", original.config.intermediate_size)
    assert_close(converted, trained, eps, what="logits")
    assert rel_diff(converted, base_logits) > bound(eps, 1.0)  # and the adapter does change the logits


def test_loraplus_uses_distinct_learning_rates(tiny_model, tmp_path):
    rec = Recorder()
    out = train(make_spec(tiny_model, adapter={"loraplus_lr_ratio": 16}),
                write_jsonl(tmp_path / "t.jsonl", pr_rows(16)), tmp_path / "run", callbacks=rec, max_steps=2)
    assert out.optimizer.startswith("loraplus+adamw_torch")
    lrs = out.extra["optimizer_lrs"]
    assert 5e-3 in lrs and pytest.approx(5e-3 * 16) in lrs
    assert all(math.isfinite(x) for x in rec.losses())


def test_dpo_uses_the_disabled_adapter_as_reference(tiny_model, tmp_path):
    from peft import PeftModel

    rec = Recorder()
    out = train(make_spec(tiny_model, method="dpo"), write_jsonl(tmp_path / "p.jsonl", pref_rows()),
                tmp_path / "run", callbacks=rec, max_steps=3)
    first = rec.steps[0][1]
    # policy == reference at step 1 (LoRA B = 0), so the DPO loss is -log sigmoid(0) = log(2), up to the
    # rounding of that fp32 result
    assert_close(first["loss"], math.log(2), unit_roundoff("float32"), what="loss")
    assert "rewards/chosen" in first and all(math.isfinite(x) for x in rec.losses())
    assert rec.losses()[-1] < math.log(2)
    PeftModel.from_pretrained(load_base(tiny_model), out.adapter_path)

    with pytest.raises(ConfigError) as e:  # DPO needs preference rows
        train(make_spec(tiny_model, method="dpo"), write_jsonl(tmp_path / "t.jsonl", pr_rows(4)), tmp_path / "r2")
    assert e.value.field == "method"


# ----------------------------------------------------------------------------- checkpoints, resume, stop


def test_stop_then_resume_sees_the_same_batches_as_an_uninterrupted_run(tiny_model, tmp_path, capture_batches):
    rows = [{"prompt": f"id{i:02d}:", "response": f" v{i % 5}"} for i in range(24)]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = make_spec(tiny_model, hp={"epochs": 2, "batch_size": 4})  # 12 steps, crossing an epoch boundary

    def fingerprints(batches):
        return [hashlib.sha256(b["input_ids"].numpy().tobytes()).hexdigest()[:12] for b in batches]

    full = Recorder()
    train(spec, f, tmp_path / "full", callbacks=full)
    full_batches = fingerprints(capture_batches)
    assert len(full_batches) == 12 == full.total
    capture_batches.clear()

    first = Recorder(stop_at=5)
    out = train(spec, f, tmp_path / "split", callbacks=first, checkpoint_steps=4)
    assert out.stopped and out.adapter_path is None
    assert [s for s, _ in first.checkpoints] == [4, 5] and out.last_checkpoint.endswith("checkpoint-5")
    assert (Path(out.last_checkpoint) / "optimizer.pt").is_file()
    assert len(capture_batches) == 5

    second = Recorder()
    out2 = train(spec, f, tmp_path / "split", callbacks=second, checkpoint_steps=4, resume_from_checkpoint=True)
    assert out2.resumed_from.endswith("checkpoint-5") and not out2.stopped
    assert fingerprints(capture_batches) == full_batches  # same order, nothing repeated or skipped
    assert [s for s, _ in second.steps] == list(range(6, 13))
    full_losses = dict((s, m["loss"]) for s, m in full.steps)
    eps = rounding_eps("float32", 4 * 128)  # fp32 steps; a weight gradient sums the batch's tokens
    assert_close([m["loss"] for _, m in second.steps], [full_losses[s] for s, _ in second.steps], eps,
                 what="losses")
    assert_close(out2.metrics["train_loss"], full.steps[-1][1]["loss"], eps, what="train_loss")


# ----------------------------------------------------------------------------- non-finite numbers


def test_a_nan_loss_stops_the_run_at_that_step_before_any_checkpoint(nan_model, tmp_path):
    rec = Recorder()
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"^loss became nan at step 1$") as e:
        train(make_spec(nan_model), write_jsonl(tmp_path / "t.jsonl", pr_rows(16)), run, callbacks=rec,
              max_steps=4, checkpoint_steps=1)
    assert "learning_rate" in e.value.hint
    assert rec.steps == [] and not (run / "adapter").exists() and not list(run.glob("checkpoints/checkpoint-*"))


def test_a_non_finite_gradient_norm_stops_the_run(tiny_model, tmp_path):
    # LoRA B starts at zero, so the first forward (and loss) is finite; alpha 1e38 overflows its gradient
    spec = make_spec(tiny_model)
    spec = spec.model_copy(update={"adapter": spec.adapter.model_copy(update={"alpha": 1e38})})
    with pytest.raises(TrainingError, match=r"^gradient norm became (inf|nan) at step 1$"):
        train(spec, write_jsonl(tmp_path / "t.jsonl", pr_rows(8)), tmp_path / "run", max_steps=2)
    check_finite_step(3, {"loss": 1.25, "grad_norm": 0.5})


def test_an_adapter_with_non_finite_weights_is_refused(tiny_model, tmp_path, monkeypatch):
    import torch

    # the step's loss and gradient are finite; the update then poisons one adapter tensor
    step = torch.optim.AdamW.step

    def poisoning_step(self, *a, **kw):
        out = step(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    f = write_jsonl(tmp_path / "t.jsonl", pr_rows(8))
    ok = train(make_spec(tiny_model), f, tmp_path / "ok", max_steps=1).adapter_path
    check_finite_adapter(ok)  # a normal adapter passes
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    rec = Recorder()
    with pytest.raises(TrainingError, match="the trained adapter has non-finite weights in 1 tensor") as e:
        train(make_spec(tiny_model), f, tmp_path / "run", callbacks=rec, max_steps=1)
    assert [s for s, _ in rec.steps] == [1] and math.isfinite(rec.steps[0][1]["loss"])
    assert e.value.hint


# ----------------------------------------------------------------------------- refusals


def test_unknown_base_model_is_a_config_error(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", pr_rows(4))
    with pytest.raises(ConfigError) as e:
        train(make_spec(tmp_path / "no-such-model"), f, tmp_path / "run")
    assert e.value.field == "base_model" and "no-such-model" in str(e.value) and "no such directory" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        train(make_spec(tmp_path / "empty"), f, tmp_path / "run")
    assert e.value.field == "base_model" and "config.json" in str(e.value)


def test_memory_refusal_happens_before_loading(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", pr_rows(4))
    spec = make_spec(tiny_model, hp={"batch_size": 64, "max_length": 1024})
    with pytest.raises(ResourceError) as e:
        train(spec, f, tmp_path / "run", memory_budget_bytes=8 * 2**20)
    assert "8.00 MiB" in str(e.value) and ("micro-batch" in e.value.hint or "max_length" in e.value.hint)
    assert not (tmp_path / "run").exists()


def test_peft_refusal_names_the_spec_field(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", pr_rows(4))
    with pytest.raises(ConfigError) as e:
        train(make_spec(tiny_model, adapter={"target_modules": ["no_such_proj"]}), f, tmp_path / "run")
    assert e.value.field == "adapter.target_modules"
    with pytest.raises(ConfigError) as e:
        train(make_spec(tiny_model, adapter={"init": "pissa"}, quantization="nf4"), f, tmp_path / "run2")
    assert e.value.field == "adapter.init"
