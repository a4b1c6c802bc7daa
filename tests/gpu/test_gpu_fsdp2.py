"""FSDP2 on one GPU: the sharded path of N ranks (torchrun, accelerate's fully_shard, DTensor parameters, the
gathered adapter save, the sharded checkpoint) run with world size 1, against the one-process run of the same spec.

For QLoRA (nf4, 4-bit weights stored as bf16) and bf16 LoRA, on a small random-weight Llama (tests/gpu/model.py's
"tiny" shape: 2 layers, 64 wide, Llama 3's vocabulary), each through ``tunekit.finetune`` as a user runs it, the
single-process and the FSDP2 jobs side by side:

  - both jobs succeed; the FSDP2 one records the layout fsdp2, world size 1, and its model really was sharded
    (FSDP2 units counted in the trained model) with torch's AdamW (the one-process run's too: fp32 state, also for
    QLoRA);
  - the losses of every step are those of the one-process run within a bf16 bound (tests/tolerance.py): both
    compute in bf16 from the same weights, data order and optimizer arithmetic, and the loss falls in both;
  - the saved adapter is standard PEFT: ``PeftModel.from_pretrained`` loads it, and its logits are the
    one-process adapter's (within 5% of the distance training moved them from the base), the adapter tensors
    within Adam's bf16 rounding scale;
  - its checkpoints hold the adapter's shards only, in torch.distributed.checkpoint's format;
  - ``merge_adapter`` merges it onto the 16-bit base (its own merge check passes).

Skipped without CUDA. On failure the jobs' errors, rank errors and worker log tails are in the message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA (FSDP2 runs on GPU ranks only)", allow_module_level=True)
pytest.importorskip("trl")

import tunekit  # noqa: E402
from tests.tolerance import assert_close, unit_roundoff  # noqa: E402
from tunekit.schemas.job import JobStatus  # noqa: E402

pytestmark = pytest.mark.gpu

ROWS, BATCH, LR = 32, 4, 2e-3  # 8 optimizer steps; the tiny shape needs a large rate to move in 8 steps
R = 8
ANSWERS = ["The sky is blue at noon.", "Seven green apples fell.", "A red boat crossed the lake.",
           "The library opens at nine."]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from .model import build

    path = tmp_path_factory.mktemp("fsdp2") / "tiny-L2"
    build(path, "tiny", 2, "cuda")
    return path


def _kw(model: Path, quantization: str, **local) -> dict:
    return dict(base_model=str(model), backend="local", quantization=quantization,
                adapter={"r": R, "alpha": 2 * R, "dropout": 0.0},  # no dropout: the runs are comparable
                hyperparameters={"batch_size": BATCH, "max_length": 64, "epochs": 1, "learning_rate": LR,
                                 "warmup_ratio": 0.0, "lr_scheduler": "constant", "seed": 7},
                # checkpointing on every layer: the speed plan's per-layer checkpointing runs inside FSDP2's units
                provider_options={"local": {"packing": False, "gradient_checkpointing": True, "checkpoint_steps": 4,
                                            **local}})


def _diagnose(job) -> str:
    """Everything a failed run left: the job's error, each rank's error file, the worker log's tail."""
    from tunekit.backends.local.process import job_dir

    d = job_dir(job.id)
    parts = [f"job {job.id} status={job.status} error={job.error!r}"]
    for p in sorted((d / "ranks").glob("error-*.json")):
        e = json.loads(p.read_text())
        parts.append(f"{p.name}: {e.get('error')}\n{e.get('traceback', '')[-3000:]}")
    log = d / "worker.log"
    if log.is_file():
        parts.append("worker.log tail:\n" + log.read_text(errors="replace")[-6000:])
    for p in sorted((d / "ranks" / "logs").rglob("*.log"))[:4]:
        parts.append(f"{p}:\n" + p.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_fsdp2_on_one_gpu_trains_the_one_process_run(quantization, small_model, tmp_path, figures):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.adapters.merge import merge_adapter
    from tunekit.store import default_store

    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: fact {i % 4}?", "response": " " + ANSWERS[i % 4]})
                            + "\n" for i in range(ROWS)))
    t0 = time.perf_counter()
    # both at once (separate worker processes): the GPU has room, the imports overlap
    one = tunekit.finetune(data, suffix=f"one-{quantization}", **_kw(small_model, quantization))
    two = tunekit.finetune(data, suffix=f"fsdp2-{quantization}", **_kw(small_model, quantization, gpus=1,
                                                                       layout="fsdp2"))
    for job in (one, two):
        job.wait(timeout=240)
    seconds = time.perf_counter() - t0
    assert one.status == JobStatus.SUCCEEDED, _diagnose(one)
    assert two.status == JobStatus.SUCCEEDED, _diagnose(two)

    layout = two.record.request["layout"]
    assert (layout["kind"], layout["world_size"]) == ("fsdp2", 1) and one.record.request["layout"] is None
    assert layout["quant_storage"] == ("bf16" if quantization == "nf4" else None)
    store = default_store()
    info_one, info_two = (store.get_adapter(j.result.registry_id).info for j in (one, two))
    trainer_two = info_two["trainer"]
    assert trainer_two["fsdp_units"] >= 3, trainer_two  # 2 decoder layers + the root (+ embeddings, head)
    assert info_one["trainer"]["fsdp_units"] == 0
    assert info_two["config"]["optimizer"].startswith("adamw_torch_fused"), info_two["config"]["optimizer"]
    if quantization == "nf4":
        assert trainer_two["base_linear_class"] == "Linear4bit"  # QLoRA really: 4-bit base layers
        assert info_one["config"]["optimizer"].startswith("adamw_torch_fused")

    # ---- the losses: step for step those of one process, within bf16 rounding
    la, lb = one.metrics("train"), two.metrics("train")
    steps = [r["step"] for r in la]
    assert [r["step"] for r in lb] == steps == list(range(1, ROWS // BATCH + 1))
    loss_a, loss_b = [r["loss"] for r in la], [r["loss"] for r in lb]
    figure = {"test": "fsdp2_one_gpu", "quantization": quantization, "device": torch.cuda.get_device_name(0),
              "losses_one_process": [round(x, 5) for x in loss_a], "losses_fsdp2": [round(x, 5) for x in loss_b],
              "max_loss_diff": max(abs(a - b) for a, b in zip(loss_a, loss_b)),
              "fsdp_units": trainer_two["fsdp_units"], "optimizer_fsdp2": info_two["config"]["optimizer"],
              "optimizer_one": info_one["config"]["optimizer"], "seconds_both_jobs": round(seconds, 1),
              "peak_memory_gib": [round(j.result.metrics["peak_memory_bytes"] / 2**30, 3) for j in (one, two)]}
    figures(figure)
    u = unit_roundoff("bfloat16")  # both paths compute in bf16 from the same values: they differ by its rounding
    assert_close(loss_b, loss_a, u, what=f"losses {figure}")
    for losses in (loss_a, loss_b):  # and training happened
        assert all(map(lambda x: x == x and abs(x) < float("inf"), losses))
        assert sum(losses[-3:]) < sum(losses[:3]), losses

    # ---- the checkpoints: the adapter's shards only (torch.distributed.checkpoint), readable in one process
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert [c["step"] for c in two.result.checkpoints] == [4, 8], two.result.checkpoints
    ckpt = Path(two.result.checkpoints[0]["path"])
    dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", tmp_path / "ckpt4.pt")
    shards = torch.load(tmp_path / "ckpt4.pt", weights_only=True)["model"]
    assert len(shards) == 7 * 2 * 2 and all("lora_" in k for k in shards), sorted(shards)[:4]
    assert all(torch.isfinite(v).all() for v in shards.values())

    # ---- the adapter: standard PEFT files, the one-process adapter's tensors and logits
    pa, pb = Path(one.result.adapter_path), Path(two.result.adapter_path)
    wa, wb = load_file(pa / "adapter_model.safetensors"), load_file(pb / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 7 * 2 * 2, sorted(wb)  # 7 linears x (A, B) x 2 layers
    assert max(v.numel() for v in wa.values()) < 4096  # bitsandbytes' fp32-state size (docstring)
    # B starts at zero: its norm is how far training moved it. (Element-wise Adam bounds do not hold in bf16: an
    # element whose gradient is within rounding of zero steps either way; the norm of the difference does.)
    b_keys = [k for k in wa if "lora_B" in k]
    moved_b = sum(float(wa[k].float().norm()) for k in b_keys)
    diff_b = sum(float((wb[k].float() - wa[k].float()).norm()) for k in b_keys)
    assert moved_b > 0 and diff_b < 0.05 * moved_b, (diff_b, moved_b)

    # logits in fp32 on the 16-bit base: differences come from the adapters alone, not from output rounding
    tok = AutoTokenizer.from_pretrained(pb)
    ids = tok(["Q1: fact 1?" + ANSWERS[1]], return_tensors="pt").input_ids.cuda()
    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32, device_map={"": 0})
    base_logits = _logits(base, ids)
    model = PeftModel.from_pretrained(base, pa, adapter_name="one")  # loads: the standard PEFT format
    model.load_adapter(pb, adapter_name="fsdp2")
    model.set_adapter("one")
    logits_a = _logits(model, ids)
    model.set_adapter("fsdp2")
    logits_b = _logits(model, ids)
    moved = float((logits_a - base_logits).norm())
    assert moved > 0
    assert float((logits_b - logits_a).norm()) < 0.05 * moved, (float((logits_b - logits_a).norm()), moved)
    del model, base

    # ---- merge (one process, afterwards): onto the 16-bit base, its own check passes
    merged = merge_adapter(two.result.registry_id, tmp_path / "merged", base_model=str(small_model))
    assert merged.saved and not merged.flagged, merged
    assert (tmp_path / "merged" / "config.json").is_file()
    figures({**figure, "merge_top1_agreement": merged.top1_agreement, "merge_max_abs_diff": merged.max_abs_diff,
             "seconds_test": round(time.perf_counter() - t0, 1)})
