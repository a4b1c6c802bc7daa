"""Sequence packing of SFT rows (provider_options.local.packing) on a tiny random Llama, CPU.

Packed rows must not see each other: TRL's padding-free collator restarts position_ids at each row and
transformers' attention builds a block-diagonal causal mask from them (masking_utils.find_packed_sequence_indices).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tunekit._exceptions import ConfigError  # noqa: E402
from tunekit.schemas.spec import TrainingSpec  # noqa: E402
from tests.tolerance import rel_diff, bound, rounding_eps  # noqa: E402
from tests.train_recorder import Recorder  # noqa: E402
from tests.train_recorder import train_files as train  # noqa: E402
from tests.test_local_train import capture_batches, pref_rows  # noqa: E402,F401 (fixture)

pytestmark = pytest.mark.slow


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixed_rows(n: int = 12) -> list[dict]:
    """Distinct prompt/response rows of 10 to ~60 tokens (byte tokenizer): several fit one 128-token sequence."""
    return [{"prompt": f"Q{i}:" + " x" * (3 * i), "response": f" A{i}" + " y" * (i % 5 + 1)} for i in range(n)]


def make_spec(model: Path, **kw) -> TrainingSpec:
    hp = {"batch_size": 2, "learning_rate": 5e-3, "max_length": 128, "warmup_ratio": 0.0, **kw.pop("hp", {})}
    return TrainingSpec(base_model=str(model), hyperparameters=hp, adapter={"r": 8, "alpha": 16}, **kw)


def segments(position_ids) -> list[tuple[int, int]]:
    """(start, end) of each packed row: position ids restart at 0 where a row begins."""
    pos = position_ids[0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return list(zip(starts, starts[1:]))


@pytest.fixture
def packed_batch(tiny_model, tmp_path, capture_batches):
    data = write_jsonl(tmp_path / "train.jsonl", mixed_rows())
    out = train(make_spec(tiny_model), data, tmp_path / "out", packing=True, max_steps=1)
    assert out.extra["packing"] is True
    batch = capture_batches[0]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free: one flat row
    assert len(segments(batch["position_ids"])) > 2  # several rows share the sequence
    return batch


def test_packed_rows_see_only_themselves(tiny_model, packed_batch):
    """Each row's logits inside the packed sequence equal those of the row alone (fp32 rounding bound); with
    position ids that do not restart per row, the same check fails (rows then attend to earlier rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.config.use_cache = False  # as train() sets it: with a KV cache, transformers does not look for packing
    ids, pos = packed_batch["input_ids"], packed_batch["position_ids"]
    segs = segments(pos)
    # the longest reduction: the attention over the packed sequence or the MLP's inner width
    eps = rounding_eps("float32", max(ids.shape[1], model.config.intermediate_size))

    def worst(logits) -> float:
        """The largest ratio of a row's difference to its bound, over the packed rows."""
        ratios = []
        for a, b in segs:
            alone = model(input_ids=ids[:, a:b], attention_mask=torch.ones_like(ids[:, a:b])).logits
            ratios.append(rel_diff(logits[:, a:b], alone) / bound(eps, 1.0))  # norm-wise, relative
        return max(ratios)

    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits
        assert worst(packed) <= 1.0
        not_reset = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits
        assert worst(not_reset) > 10.0  # cross-contamination is far outside rounding


def test_packed_labels_are_the_completions_only(tiny_model, packed_batch):
    """Packed, each row still trains on its completion tokens only (as unpacked: completion_only_loss)."""
    from transformers import AutoTokenizer

    from tunekit.backends.local.datasets import prompt_completion_example

    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = {}
    for row in mixed_rows():
        ex = prompt_completion_example(tok, row["prompt"], row["response"] + tok.eos_token)
        expected[tuple(ex["input_ids"])] = [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])]
    ids, labels = packed_batch["input_ids"][0].tolist(), packed_batch["labels"][0].tolist()
    for a, b in segments(packed_batch["position_ids"]):
        want = expected[tuple(ids[a:b])]  # a whole row: bfd packing never splits one
        assert labels[a:b] == [-100] + want[1:]  # the first token is never predicted (from the previous row)
        assert any(t != -100 for t in labels[a:b])


def test_plan_records_and_shows_the_decision(tiny_model, tmp_path):
    from tunekit.api import plan
    from tunekit.backends.local.run import LocalRun, check_facts, run_for_files

    data = write_jsonl(tmp_path / "train.jsonl", mixed_rows())
    default = run_for_files(make_spec(tiny_model), data, tmp_path / "o0")
    assert default.training.packing.requested is False and default.training.packing.enabled is False  # off unless asked
    auto = run_for_files(make_spec(tiny_model), data, tmp_path / "o1", packing="auto")
    assert auto.training.packing.requested == "auto" and auto.training.packing.enabled is None
    assert auto.training.estimated_total_steps is None  # rows per step depend on how they pack
    on = run_for_files(make_spec(tiny_model), data, tmp_path / "o2", packing=True)
    assert (on.training.packing.enabled, on.training.packing.reason) == (True, "requested")
    off = run_for_files(make_spec(tiny_model), data, tmp_path / "o3", packing=False)
    assert off.training.packing.enabled is False and off.training.estimated_total_steps == 6  # 12 rows / 2 x 3 epochs

    # the stored run keeps it, and a re-plan on another device (check_facts, as a resumed worker does) too
    assert LocalRun.model_validate(on.model_dump(mode="json")).training.packing == on.training.packing
    moved = on.model_copy(update={"device": on.device.model_copy(update={"name": "another"})})
    again, changes = check_facts(moved, make_spec(tiny_model))
    assert changes and again.training.packing == on.training.packing

    spec = make_spec(tiny_model, provider_options={"local": {"packing": False}})
    notes = plan(spec, "local").notes
    assert "packing: off (requested)" in notes


def test_auto_decides_from_the_tokenized_rows(tiny_model, tmp_path):
    """'auto' packs rows averaging at most half of max_length, and leaves longer ones alone."""
    data = write_jsonl(tmp_path / "train.jsonl", mixed_rows())
    rec = Recorder()
    short = train(make_spec(tiny_model), data, tmp_path / "a", max_steps=1, callbacks=rec, packing="auto")
    assert short.extra["packing"] is True
    assert any(m.startswith("packing: on (auto: rows average") for _, m in rec.events)
    long = train(make_spec(tiny_model, hp={"max_length": 32}), data, tmp_path / "b", max_steps=1, packing="auto")
    assert long.extra["packing"] is False


def test_dpo_refuses_packing(tiny_model, tmp_path):
    from tunekit.backends.local.run import run_for_files

    data = write_jsonl(tmp_path / "pref.jsonl", pref_rows(4))
    with pytest.raises(ConfigError) as err:
        run_for_files(make_spec(tiny_model, method="dpo"), data, tmp_path / "o", packing=True)
    assert err.value.field == "provider_options.local.packing" and "DPO" in str(err.value)
    auto = run_for_files(make_spec(tiny_model, method="dpo"), data, tmp_path / "o", packing="auto")
    assert auto.training.packing.enabled is False


def test_resume_keeps_the_packing(tiny_model, tmp_path, capture_batches):
    """A run stopped and resumed trains the same packed sequences in the same order as one uninterrupted run."""
    data = write_jsonl(tmp_path / "train.jsonl", mixed_rows(24))
    spec = make_spec(tiny_model, hp={"epochs": 1})
    full = Recorder()
    train(spec, data, tmp_path / "full", callbacks=full, packing=True)
    whole = [b["input_ids"].tolist() for b in capture_batches]
    assert full.total == len(whole) < 12  # 24 rows, 2 per unpacked step: packed, fewer steps
    capture_batches.clear()

    first = Recorder(stop_at=2)
    assert train(spec, data, tmp_path / "split", callbacks=first, packing=True, checkpoint_steps=1).stopped
    out = train(spec, data, tmp_path / "split", callbacks=Recorder(), packing=True, checkpoint_steps=1,
                resume_from_checkpoint=True)
    assert out.resumed_from.endswith("checkpoint-2") and out.extra["packing"] is True
    assert [b["input_ids"].tolist() for b in capture_batches] == whole
