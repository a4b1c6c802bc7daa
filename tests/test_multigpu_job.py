"""Several ranks of one local job: torchrun under the detached worker, DDP over gloo on CPU with the tiny
model, through the real launcher and worker (each run spawns `python -m tunekit.backends.local.worker`)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import tunekit
from tunekit._exceptions import ConfigError
from tunekit.backends.local.backend import LocalBackend
from tunekit.backends.local.launch import root_cause, torchrun_argv
from tunekit.backends.local.process import job_dir
from tunekit.schemas.job import JobStatus
from tunekit.schemas.spec import TrainingSpec
from tunekit.store import default_store
from tests.test_local_job import _wait_for, paced  # noqa: F401 - paced: the fixture pacing workers (and their ranks)
from tests.tolerance import adam_scale, assert_close, rounding_eps

ROWS = 32  # batch 4 -> 8 optimizer steps per epoch


@pytest.fixture
def train(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} plus 1?", "response": f"{i + 1}"}) + "\n"
                            for i in range(ROWS)))
    return path


def _kw(model, **options):
    # no dropout: each rank draws its own dropout masks, so only the dropout-free runs are comparable;
    # packing off: these jobs count unpacked steps (rows / batch_size), and 'auto' would pack the tiny rows
    return dict(base_model=str(model), backend="local", adapter={"r": 8, "dropout": 0.0},
                hyperparameters={"batch_size": 4, "max_length": 64, "epochs": 1},
                provider_options={"local": {"checkpoint_steps": 4, "packing": False, **options}})


def _adapter(job):
    from safetensors.torch import load_file

    return load_file(Path(job.result.adapter_path) / "adapter_model.safetensors")


def _rank_pid(job_id: str, rank: int) -> int:
    """The pid of one rank of the job (torchrun sets RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if job_id.encode() in argv and b"--rank" in argv and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} of {job_id} running")


@pytest.mark.slow
def test_two_ranks_train_the_one_process_run(tiny_model, train):
    """Same global batch, data order and learning rate: the losses and the adapter of 2 ranks x micro-batch 2
    equal those of 1 process x micro-batch 4 up to fp32 rounding."""
    one = tunekit.finetune(train, suffix="one", **_kw(tiny_model)).wait(timeout=300)
    two = tunekit.finetune(train, suffix="two", **_kw(tiny_model, gpus=2)).wait(timeout=300)
    assert one.status == two.status == JobStatus.SUCCEEDED, (one.error, two.error)
    layout = two.record.request["layout"]
    assert (layout["kind"], layout["world_size"], layout["micro_batch"], layout["grad_accum"]) == ("ddp", 2, 2, 1)
    assert one.record.request["layout"] is None

    # metrics, events and checkpoints come from rank 0 alone: one row per step, one event per checkpoint
    la, lb = one.metrics("train"), two.metrics("train")
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, 9))
    eps = rounding_eps("float32", 4 * 64)  # a weight gradient sums the global batch's 4 x 64 tokens
    assert_close([r["loss"] for r in lb], [r["loss"] for r in la], eps, what="losses")
    kinds = [e.type for _, e in default_store().events(two.id)]
    assert kinds.count("checkpoint") == 2 and kinds.count("start") == 1 and kinds.count("result") == 1
    assert [c["step"] for c in two.result.checkpoints] == [4, 8]
    assert two.result.metrics["tokens"] == one.result.metrics["tokens"]  # every rank's tokens counted

    # the adapter: standard PEFT files, registered as for one process, equal within Adam's rounding scale
    wa, wb = _adapter(one), _adapter(two)
    assert wa.keys() == wb.keys()
    lr = TrainingSpec(base_model="m").hyperparameters.learning_rate
    for k in wa:
        assert_close(wb[k], wa[k], eps, scale=adam_scale([lr] * 8, wa[k].numel()), what=k)
    assert json.loads((Path(two.result.adapter_path) / "adapter_config.json").read_text())["r"] == 8
    entry = default_store().get_adapter(two.result.registry_id)
    assert entry.job_id == two.id and entry.info["config"]["micro_batch"] == 2


@pytest.mark.slow
def test_cancel_stops_every_rank_at_one_checkpoint(tiny_model, train, paced):
    with paced():  # every rank's steps are paced (the ranks inherit the worker's environment)
        job = tunekit.finetune(train, **_kw(tiny_model, gpus=2, checkpoint_steps=100))
    _wait_for(job, lambda j: j.status == JobStatus.RUNNING and (j.progress.get("step") or 0) >= 2, timeout=120.0)
    job.cancel()
    job.wait(timeout=120)
    assert job.status == JobStatus.CANCELLED and "cancel requested" in job.error
    stopped_at = job.result.checkpoints[-1]["step"]
    assert 2 <= stopped_at < 8 and job.result.adapter_path is None


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_with_its_error_and_resume_finishes(tiny_model, train, paced):
    with paced():  # the resumed ranks run at full speed
        job = tunekit.finetune(train, **_kw(tiny_model, gpus=2))
    _wait_for(job, lambda j: j.progress.get("last_checkpoint") and j.progress.get("step", 0) >= 5, timeout=120.0)
    os.kill(_rank_pid(job.id, 1), signal.SIGKILL)
    job.wait(timeout=120)
    assert job.status == JobStatus.FAILED
    assert "rank 1 of 2 failed: killed by SIGKILL" in job.error and f"tunekit jobs resume {job.id}" in job.error
    assert [c["step"] for c in job.result.checkpoints] == [4]

    job.resume()
    job.wait(timeout=300)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert [r["step"] for r in job.metrics("train")] == list(range(1, 9))  # no step twice
    assert job.result.metrics["steps"] == 8 and Path(job.result.adapter_path, "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_an_error_in_the_ranks_fails_the_job_with_it_and_its_hint(tiny_model, train):
    job = tunekit.finetune(train, **{**_kw(tiny_model, gpus=2), "adapter": {"target_modules": ["no_such_proj"]}})
    job.wait(timeout=180)
    assert job.status == JobStatus.FAILED
    assert re.search(r"rank [01] of 2 failed: ConfigError: .*no_such_proj", job.error), job.error
    assert "`tunekit plan` shows the resolved adapter config" in job.error  # the rank's own hint
    assert sorted(p.name for p in (job_dir(job.id) / "ranks").glob("error-*.json")) == ["error-0.json",
                                                                                      "error-1.json"]


# ------------------------------------------------------------------------------------------ fast parts

def test_the_root_cause_is_the_killed_rank_else_the_first_error_written(tmp_path):
    def failure(code):
        return SimpleNamespace(exitcode=code, signal_name=lambda: {-9: "SIGKILL", -15: "SIGTERM"}.get(code))

    # rank 1 was killed; torchrun then ended rank 0 with SIGTERM (or it failed in its collective first)
    assert root_cause({0: failure(-15), 1: failure(-9)}, tmp_path) == (1, "killed by SIGKILL", None)
    assert root_cause({0: failure(1), 1: failure(-9)}, tmp_path) == (1, "killed by SIGKILL", None)
    assert root_cause({2: failure(-15), 1: failure(-15)}, tmp_path) == (1, "killed by SIGTERM", None)
    (tmp_path / "error-0.json").write_text(json.dumps({"rank": 0, "time": 2.0, "error": "RuntimeError: gloo"}))
    (tmp_path / "error-3.json").write_text(json.dumps({"rank": 3, "time": 1.0, "error": "ValueError: bad row",
                                                       "hint": "fix line 3"}))
    assert root_cause({0: failure(1), 3: failure(1)}, tmp_path) == (3, "ValueError: bad row", "fix line 3")
    assert root_cause({0: failure(-15), 3: failure(1)}, tmp_path) == (3, "ValueError: bad row", "fix line 3")


def test_torchrun_gets_the_ranks_and_the_rendezvous(tmp_path):
    one_node = torchrun_argv("tk-1", {"gpus": 4, "nnodes": 1}, {}, None, tmp_path)
    assert "--nproc-per-node=4" in one_node and "--standalone" in one_node
    assert one_node[-4:] == ["-m", "tunekit.backends.local.worker", "tk-1", "--rank"]
    nodes = torchrun_argv("tk-1", {"gpus": 8, "nnodes": 2}, {"node_rank": 1, "rdzv_endpoint": "10.0.0.1:29500"},
                          "/ckpt/checkpoint-4", tmp_path)
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29500",
            "--rdzv-id=tunekit"} <= set(nodes) and "--standalone" not in nodes
    assert nodes[-2:] == ["--resume", "/ckpt/checkpoint-4"]


def _plan(model, **options):
    spec = TrainingSpec(**{k: v for k, v in _kw(model, **options).items() if k != "backend"})
    return LocalBackend().plan(spec)


def test_the_plan_shows_the_layout_and_the_options(tiny_model):
    plan = _plan(tiny_model, gpus=2)
    assert plan.request["layout"]["kind"] == "ddp" and plan.request["options"]["gpus"] == 2
    assert any(n.startswith("layout: ddp on 2 GPU(s): micro-batch 2 per rank x 2 ranks") for n in plan.notes)
    assert _plan(tiny_model).request["layout"] is None


@pytest.mark.parametrize("options,field", [
    ({"gpus": 0}, "gpus"), ({"gpus": "some"}, "gpus"), ({"gpus": 3}, "batch_size"),
    ({"nnodes": 2}, "rdzv_endpoint"), ({"nnodes": 2, "rdzv_endpoint": "head:29500", "node_rank": 2}, "node_rank"),
    ({"gpus": 2, "rdzv_endpoint": "no port"}, "rdzv_endpoint"), ({"gpus": 2, "layout": "zero3"}, "layout"),
    ({"layout": "fsdp2"}, "layout"), ({"gpus": 2, "layout": "fsdp2"}, "layout"),  # FSDP2 on CPU ranks
])
def test_bad_multi_gpu_options_are_refused_with_the_field(tiny_model, options, field):
    with pytest.raises(ConfigError) as exc:
        _plan(tiny_model, **options)
    assert exc.value.field.endswith(field), exc.value.field


def test_trainer_arguments_of_each_layout(tiny_model):
    """DDP is the Trainer's own under torchrun; FSDP2 goes through accelerate's plugin (fsdp_version 2), one unit
    per decoder layer. (FSDP2 through the Trainer needs GPU ranks: tests/gpu/test_gpu_fsdp2.py runs it.)"""
    from transformers import AutoModelForCausalLM

    from tunekit.backends.local.ranks import trainer_args

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert trainer_args(None, model, on_gpu=False) == {}
    ddp = trainer_args({"kind": "ddp", "world_size": 2, "nnodes": 1}, model, on_gpu=False)
    assert ddp == {"ddp_backend": "gloo", "ddp_find_unused_parameters": False, "save_on_each_node": False}
    fsdp = trainer_args({"kind": "fsdp2", "world_size": 16, "nnodes": 2}, model, on_gpu=True)
    assert fsdp["ddp_backend"] == "nccl" and fsdp["save_on_each_node"] is True  # each node resumes from its own
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_gpus_are_checked_against_the_visible_ones(tiny_model, monkeypatch):
    """On a GPU machine (faked where the device is read): 'all' is the visible count, more is refused, and a
    plan without `gpus` is one process whatever is visible."""
    import tunekit.backends.local.layout as layout_mod
    import tunekit.backends.local.resolve as resolve_mod
    from tunekit.backends.local.peft_config import DeviceInfo

    monkeypatch.setattr(resolve_mod, "device_info", lambda device=None: DeviceInfo("cuda", 80 * 10**9, "x"))
    monkeypatch.setattr(layout_mod, "_visible_gpus", lambda: 4)
    assert _plan(tiny_model, gpus="all").request["layout"]["gpus"] == 4
    assert _plan(tiny_model).request["layout"] is None
    with pytest.raises(ConfigError, match="gpus=8 but 4 CUDA GPU"):
        _plan(tiny_model, gpus=8)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_killed_worker_takes_its_ranks_with_it_and_resume_finishes(tiny_model, train, paced):
    with paced():
        job = tunekit.finetune(train, **_kw(tiny_model, gpus=2))
    _wait_for(job, lambda j: j.progress.get("last_checkpoint") and j.progress.get("step", 0) >= 5, timeout=120.0)
    ranks = [_rank_pid(job.id, r) for r in (0, 1)]
    os.kill(job.record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_running(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(p) for p in ranks), "a rank outlived its worker"
    job.wait(timeout=30)
    assert job.status == JobStatus.FAILED and "vanished" in job.error

    job.resume()
    job.wait(timeout=300)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert [r["step"] for r in job.metrics("train")] == list(range(1, 9))


def test_a_rank_does_not_outlive_the_worker_that_started_it(tmp_path):
    """Whatever the collective backend does when the launcher's store vanishes, a rank ends with its parent."""
    import subprocess
    import sys

    pidfile = tmp_path / "child.pid"
    child = ("import os, time; from tunekit.backends.local.launch import _die_with_parent; _die_with_parent(); "
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"])
    deadline = time.monotonic() + 30
    while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert _running(pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def test_a_70b_bf16_plan_on_80gb_gpus_shards_and_names_the_gpus_it_needs(tmp_path, monkeypatch):
    """The plan end to end on GPUs faked where the device is read: its memory estimate is the per-GPU one of
    the layout; too few GPUs are refused with the layout that fits, and so is one GPU."""
    import tunekit.backends.local.layout as layout_mod
    import tunekit.backends.local.resolve as resolve_mod
    from tunekit._exceptions import ResourceError
    from tunekit.backends.local.peft_config import DeviceInfo
    from tests.test_multigpu_layout import LLAMA_70B

    model = tmp_path / "llama-70b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA_70B, "model_type": "llama"}))
    monkeypatch.setattr(resolve_mod, "device_info", lambda device=None: DeviceInfo("cuda", 80 * 10**9, "H100"))
    monkeypatch.setattr(layout_mod, "_visible_gpus", lambda: 8)
    monkeypatch.setattr(resolve_mod, "host_memory_bytes", lambda: 2048 * 2**30)  # the GPUs are the question here
    spec = TrainingSpec(base_model=str(model), quantization="none", adapter={"r": 16},
                        hyperparameters={"batch_size": 16, "gradient_accumulation_steps": 4, "max_length": 2048})

    def plan(**options):
        return LocalBackend().plan(spec.model_copy(update={"provider_options": {"local": options}}))

    request = plan(gpus=4).request
    assert request["layout"]["kind"] == "fsdp2" and request["layout"]["quant_storage"] is None
    assert request["memory_estimate"]["fits"] is True
    assert request["memory_estimate"]["total_bytes"] == request["layout"]["per_gpu_bytes"] < 0.92 * 80 * 10**9
    with pytest.raises(ConfigError) as exc:
        plan(gpus=2)
    assert "fsdp2 on 4 GPUs" in exc.value.hint and "gpus=4" in exc.value.hint
    one = plan()  # one GPU: shown as not fitting, with the GPUs that would
    assert one.request["memory_estimate"]["fits"] is False
    assert any("train on 4 GPUs of this size (fsdp2): provider_options.local.gpus=4" in n for n in one.notes)
    from tunekit.backends.local.memory import check_fits
    from tunekit.backends.local.run import LocalRun

    with pytest.raises(ResourceError) as exc:  # and refused at submit (its check) with the same suggestion
        check_fits(LocalRun.model_validate(one.request).memory_estimate.estimate())
    assert "gpus=4" in exc.value.hint


def test_a_rank_process_is_not_taken_for_the_jobs_worker():
    """find_remote records the worker's pid, never one of the torchrun ranks running the same module."""
    import subprocess
    import sys

    from tunekit.backends.local.process import WORKER_MODULE, find_worker_pid

    sleep = [sys.executable, "-c", "import time; time.sleep(60)", "-m", WORKER_MODULE, "job-find-pid"]
    rank = subprocess.Popen(sleep + ["--rank"])
    try:
        time.sleep(0.2)
        assert find_worker_pid("job-find-pid") is None
        worker = subprocess.Popen(sleep)
        try:
            time.sleep(0.2)
            assert find_worker_pid("job-find-pid") == worker.pid
        finally:
            worker.kill()
            worker.wait()
    finally:
        rank.kill()
        rank.wait()
