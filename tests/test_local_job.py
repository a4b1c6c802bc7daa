"""The local backend as a durable background job: the real worker process on a tiny model (CPU).

Each training test spawns `python -m tunekit.backends.local.worker` exactly as users get it; the test
process only talks to the job through the store (and signals, for the crash test).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunekit
from tunekit._exceptions import ConfigError, JobStateError, ResourceError
from tunekit.backends.local.process import checkpoints, job_dir, last_checkpoint, worker_alive
from tunekit.backends.local.run import LocalRun
from tunekit.plot import plot_metrics, terminal_plot
from tunekit.backends.local.worker import data_snapshot
from tunekit.schemas.job import JobStatus
from tunekit.schemas.spec import TrainingSpec
from tunekit.store import default_store
from tests.tolerance import adam_scale, assert_close, rounding_eps

ROWS = 32  # batch 4 -> 8 steps per epoch


@pytest.fixture
def data(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i} plus 1?", "response": f"{i + 1}"}) + "\n"
                             for i in range(ROWS)))
    val.write_text("".join(json.dumps({"prompt": f"{i} plus 2?", "response": f"{i + 2}"}) + "\n" for i in range(4)))
    return train, val


PACE = """
# put on the worker's PYTHONPATH by tests/test_local_job.py: every optimizer step takes at least {delay}s
import time
from tunekit.backends.local import train as _train

_make_bridge = _train._make_bridge


def _paced(*args):
    bridge = _make_bridge(*args)
    step_end = bridge.on_step_end

    def on_step_end(*a, **kw):
        time.sleep({delay})
        return step_end(*a, **kw)

    bridge.on_step_end = on_step_end
    return bridge


_train._make_bridge = _paced
"""


@pytest.fixture
def paced(tmp_path, monkeypatch):
    """A context in which started workers are paced (0.4 s a step) so a cancel or kill lands mid-run."""
    import contextlib

    site = tmp_path / "paced-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PACE.format(delay=0.4))

    @contextlib.contextmanager
    def pacing():
        with monkeypatch.context() as m:
            m.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
            yield
    return pacing


def _kw(model, **options):
    # packing off: these jobs count unpacked steps (rows / batch_size); 'auto' would pack the tiny rows
    return dict(base_model=str(model), backend="local", adapter={"r": 8},
                hyperparameters={"batch_size": 4, "max_length": 64, "epochs": 2},
                provider_options={"local": {"checkpoint_steps": 4, "packing": False, **options}})


def _wait_for(job, predicate, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh()
        if predicate(job):
            return job
        assert not job.status.terminal, f"job ended early: {job.status} {job.error}"
        time.sleep(0.1)
    raise AssertionError(f"timed out; job {job.status} progress {job.progress}")


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _FullDisk:
    """The store's connection on a full disk: reads work, every commit fails as SQLite reports it."""

    def __init__(self, conn):
        self._real, self.full = conn, True

    def execute(self, sql, *args):
        if self.full and sql.strip().upper() == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._real.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._real, name)


# --------------------------------------------------------------------------------------- training

# The uninterrupted run's losses and adapter, kept for the crash/resume test (which reruns it if absent).
_REFERENCE: dict = {}


def _remember(job) -> dict:
    from safetensors.torch import load_file

    return {"losses": [(r["step"], r["loss"]) for r in job.metrics("train")],
            "eval": [(r["step"], r["eval_loss"]) for r in job.metrics("eval")], "metrics": job.result.metrics,
            "adapter": load_file(Path(job.result.adapter_path) / "adapter_model.safetensors")}


@pytest.mark.slow
def test_finetune_runs_detached_and_registers_the_adapter(tiny_model, data, tmp_path):
    train, val = data
    job = tunekit.finetune(train, validation_data=val, suffix="adder", **_kw(tiny_model))
    assert job.status == JobStatus.QUEUED and job.record.pid
    # Another process follows the same job through the store alone.
    watcher = subprocess.Popen(
        [sys.executable, "-c", f"import tunekit; j = tunekit.get_job({job.id!r}); j.wait(); print(j.status.value)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    job.wait(timeout=120)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    assert out.strip() == "succeeded"
    assert job.status == JobStatus.SUCCEEDED, job.error
    # the run the worker trained (written by train()) is the run the store kept, planned once
    stored = LocalRun.model_validate(job.record.request)
    assert LocalRun.model_validate_json((job_dir(job.id) / "output" / "run.json").read_text()) == stored
    assert stored.data.train.path == str(job_dir(job.id) / "data" / "train.jsonl")
    assert stored.data.train.sha256 == _sha256(train) and stored.options.output_dir == str(job_dir(job.id) / "output")
    assert job.plan_changes == []  # same machine, same facts

    res = job.result
    adapter = Path(res.adapter_path)
    assert res.model == res.adapter_path and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert res.metrics["steps"] == 16 and res.metrics["eval_loss"] > 0
    # saved every 4 steps; the newest 3 are kept (provider_options.local.keep_checkpoints defaults to 3)
    assert [c["step"] for c in res.checkpoints] == [8, 12, 16]
    assert sorted(p.name for p in Path(res.checkpoints[0]["path"]).parent.glob("checkpoint-*")) == [
        "checkpoint-12", "checkpoint-16", "checkpoint-8"]

    # progress, heartbeats and metrics were written by the worker
    p = job.progress
    assert p["step"] == p["total_steps"] == 16 and p["loss"] > 0 and p["tokens_per_s"] > 0 and p["memory_bytes"] > 0
    assert job.record.heartbeat_at and job.record.heartbeat_at >= job.record.created_at
    train_rows, eval_rows = job.metrics("train"), job.metrics("eval")
    assert [r["step"] for r in train_rows] == list(range(1, 17))
    assert [r["step"] for r in eval_rows] == [4, 8, 12, 16] and all(r["eval_loss"] > 0 for r in eval_rows)
    kinds = [e.type for _, e in default_store().events(job.id)]
    assert kinds.count("checkpoint") == 4 and "start" in kinds and "result" in kinds

    # the registry entry says what produced the adapter
    entry = default_store().get_adapter(res.registry_id)
    assert entry.job_id == job.id and entry.location == str(adapter.resolve()) and entry.name == "adder"
    assert entry.data_sha256 == _sha256(train) and entry.base_model == str(tiny_model)
    info = entry.info
    assert info["data"]["validation"]["sha256"] == _sha256(val)
    assert info["data"]["train"]["changed_since_submit"] is False
    assert info["owner"] and info["created_at"] > 0 and info["libraries"]["peft"]
    assert info["tokenizer"]["chat_template_sha256"] and info["tokenizer"]["vocab_sha256"]
    assert info["base_model"]["fingerprint"] and info["metrics"]["steps"] == 16
    # the plan and the run agree on the resolved config
    planned = job.record.request
    assert info["config"]["optimizer"].startswith(planned["training"]["optimizer"])
    assert info["config"]["micro_batch"] == planned["training"]["micro_batch_size"]
    assert info["config"]["quantization"]["mode"] == planned["quantization"]["mode"]
    assert (job_dir(job.id) / "worker.log").is_file()

    # the loss curve, as a PNG and as text
    png = plot_metrics(job.metrics(), tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = terminal_plot(job.metrics(), width=40, height=10)
    assert "*" in text and "o" in text and "validation loss" in text
    _REFERENCE.update(_remember(job), data=(train.read_text(), val.read_text()))


@pytest.mark.slow
def test_cancel_stops_at_a_checkpoint_and_resume_finishes(tiny_model, data, paced):
    train, _ = data
    with paced():  # pace the steps so the cancel lands mid-run
        job = tunekit.finetune(train, **_kw(tiny_model, checkpoint_steps=100))
    _wait_for(job, lambda j: j.status == JobStatus.RUNNING and (j.progress.get("step") or 0) >= 2)
    job.cancel()
    assert job.status in (JobStatus.CANCELLING, JobStatus.CANCELLED)
    job.wait(timeout=60)
    assert job.status == JobStatus.CANCELLED
    stopped_at = job.result.checkpoints[-1]["step"]
    assert 2 <= stopped_at < 16 and job.result.adapter_path is None  # a checkpoint at the stop, no adapter
    assert "cancel requested" in job.error
    with pytest.raises(JobStateError):
        job.cancel()

    job.resume()  # continues from the checkpoint saved at the stop
    job.wait(timeout=120)
    assert job.status == JobStatus.SUCCEEDED and job.error is None
    assert job.result.metrics["steps"] == 16
    assert [r["step"] for r in job.metrics("train")] == list(range(1, 17))


@pytest.mark.slow
def test_killed_worker_is_detected_and_resume_matches_an_uninterrupted_run(tiny_model, data, paced):
    train, val = data
    kw = dict(validation_data=val, suffix="adder", **_kw(tiny_model))  # the same job as the first test
    if _REFERENCE.get("data") != (train.read_text(), val.read_text()):
        reference = tunekit.finetune(train, **kw).wait(timeout=120)
        assert reference.status == JobStatus.SUCCEEDED
        _REFERENCE.update(_remember(reference), data=(train.read_text(), val.read_text()))

    with paced():  # the resumed worker runs at full speed
        job = tunekit.finetune(train, **kw)
    _wait_for(job, lambda j: j.progress.get("last_checkpoint") and j.progress.get("step", 0) >= 6)
    os.kill(job.record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while job.refresh().status != JobStatus.FAILED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.status == JobStatus.FAILED
    assert f"worker process {job.record.pid} vanished" in job.error and f"tunekit jobs resume {job.id}" in job.error
    assert [c["step"] for c in job.result.checkpoints] == [4]
    killed_pid = job.record.pid

    job.resume()
    assert job.status == JobStatus.QUEUED and job.record.pid != killed_pid and job.error is None
    job.wait(timeout=120)
    assert job.status == JobStatus.SUCCEEDED, job.error

    # same steps, same losses, same adapter as the run that was never interrupted; no duplicate rows
    ref, got = _REFERENCE, _remember(job)
    assert [s for s, _ in got["losses"]] == [s for s, _ in ref["losses"]] == list(range(1, 17))
    eps = rounding_eps("float32", 4 * 64)  # fp32 steps; a weight gradient sums the batch's 4 x 64 tokens
    assert_close([b for _, b in got["losses"]], [a for _, a in ref["losses"]], eps, what="losses")
    assert [s for s, _ in got["eval"]] == [4, 8, 12, 16]
    assert_close(got["eval"][-1][1], ref["eval"][-1][1], eps, what="eval loss")
    assert got["metrics"]["steps"] == ref["metrics"]["steps"] == 16
    assert got["metrics"]["tokens"] == ref["metrics"]["tokens"]
    wa, wb = ref["adapter"], got["adapter"]
    assert wa.keys() == wb.keys()
    lr = TrainingSpec(base_model="m").hyperparameters.learning_rate  # the default the job ran with
    for k in wa:  # after 16 Adam steps: the scale is the furthest they can move the tensor
        assert_close(wb[k], wa[k], eps, scale=adam_scale([lr] * 16, wa[k].numel()), what=k)
    # the registry holds the resumed job's adapter under a name of its own
    entry = default_store().get_adapter(job.result.registry_id)
    assert entry.job_id == job.id and entry.info["resumed_from"].endswith("checkpoint-4")
    events = [e.message for _, e in default_store().events(job.id)]
    assert any("resuming from" in m and "checkpoint-4" in m for m in events)


@pytest.mark.slow
def test_worker_failure_surfaces_as_failed_with_the_reason(tiny_model, data):
    train, _ = data
    job = tunekit.finetune(train, **{**_kw(tiny_model), "adapter": {"target_modules": ["no_such_proj"]}})
    job.wait(timeout=120)
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("ConfigError:") and "adapter.target_modules" in job.error
    assert "\n" not in job.error
    errors = [e for _, e in default_store().events(job.id) if e.type == "error"]
    assert errors and "Traceback" in errors[0].data["traceback"]
    assert "Traceback" in (job_dir(job.id) / "worker.log").read_text()
    with pytest.raises(JobStateError, match="no checkpoint"):
        job.resume()


@pytest.mark.slow
def test_a_nan_loss_fails_the_job_and_registers_nothing(nan_model, data):
    train, _ = data
    job = tunekit.finetune(train, **_kw(nan_model)).wait(timeout=120)
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("TrainingError: loss became nan at step 1 (lower hyperparameters.learning_rate")
    assert job.result.checkpoints == [] and job.result.registry_id is None
    assert default_store().list_adapters() == []


@pytest.mark.slow
def test_a_full_disk_fails_the_job_with_its_cause_and_resume_continues(tiny_model, data):
    import shutil

    from transformers import Trainer

    from tunekit.backends.local import worker
    from tunekit.backends.local.backend import LocalBackend
    from tunekit.schemas.job import RemoteState

    train, _ = data
    store = default_store()
    disk = _FullDisk(store._conn)
    disk.full = False
    save = Trainer._save_checkpoint

    def save_until_full(self, model, trial):
        if self.state.global_step < 8:
            return save(self, model, trial)
        # the disk fills while step 8 is saved: trainer_state.json (written last) is cut short
        ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "trainer_state.json").write_text('{"global_step": 8, "log_hist')
        disk.full = True
        raise OSError(errno.ENOSPC, "No space left on device")

    rmtree = shutil.rmtree

    def rmtree_frees_space(path, *a, **kw):
        rmtree(path, *a, **kw)
        disk.full = False

    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:  # the worker runs in this process, so the disk can fill under it
        mp.setattr(LocalBackend, "_spawn", lambda self, job, resume_from: RemoteState(status=JobStatus.QUEUED))
        job = tunekit.finetune(train, **_kw(tiny_model))
        mp.setattr(store, "_conn", disk)
        mp.setattr(Trainer, "_save_checkpoint", save_until_full)
        mp.setattr(shutil, "rmtree", rmtree_frees_space)
        try:
            assert worker.run(job.id) == 1
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    job.refresh()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("OSError: [Errno 28] No space left on device (free disk space under ")
    assert f"then `tunekit jobs resume {job.id}` continues from step 4" in job.error
    ckpt_root = job_dir(job.id) / "output" / "checkpoints"
    assert [c["step"] for c in job.result.checkpoints] == [4] and not (ckpt_root / "checkpoint-8").exists()
    [error] = [e for _, e in store.events(job.id) if e.type == "error"]
    assert error.data["removed"] == [str(ckpt_root / "checkpoint-8")]

    # space is back: a real worker resumes from step 4 and finishes
    job.resume().wait(timeout=120)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result.metrics["steps"] == 16


def test_a_torn_newest_checkpoint_falls_back_to_the_newest_intact_one(tiny_model, data):
    train, _ = data
    store = default_store()
    rec = store.create_job("local", {"base_model": str(tiny_model)}, {"train": {"path": str(train)}})
    root = job_dir(rec.id) / "output" / "checkpoints"
    for step in (4, 8, 12):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (root / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 12, "log_hi')  # truncated
    (root / "checkpoint-16").mkdir()  # its save never reached trainer_state.json
    assert [c["step"] for c in checkpoints(rec)] == [4, 8]
    assert last_checkpoint(rec) == str(root / "checkpoint-8")


def test_status_answers_when_the_store_cannot_be_written(tiny_model, data, monkeypatch, capsys):
    from tunekit.cli.main import main

    train, _ = data
    store = default_store()
    rec = store.create_job("local", {"base_model": str(tiny_model)}, {"train": {"path": str(train)}})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_job(rec.id, status=JobStatus.RUNNING, pid=dead.pid, heartbeat_at=time.time() - 30)
    job_dir(rec.id).mkdir(parents=True)
    (job_dir(rec.id) / "worker.log").write_text(  # an earlier session's error, then this one's
        "=== 2026-12-03 09:00:00 python -m tunekit.backends.local.worker\nValueError: an earlier session\n"
        "=== 2026-12-03 10:00:00 python -m tunekit.backends.local.worker --resume x\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in save\n"
        "OSError: [Errno 28] No space left on device\n  (printed after the traceback)\n")
    disk = _FullDisk(store._conn)
    monkeypatch.setattr(store, "_conn", disk)
    assert main(["jobs", "status", rec.id]) == 0
    out = capsys.readouterr().out
    assert f"{rec.id} [local] failed" in out
    assert re.search(rf"worker process {dead.pid} vanished \(last heartbeat 3\ds ago\); its last error: "
                     r"OSError: \[Errno 28\] No space left on device; resume with", out)
    assert "note: not recorded in the store" in out and "database or disk is full" in out
    assert store.get_job(rec.id).status == JobStatus.RUNNING  # nothing was written
    assert main(["jobs", "status", rec.id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "failed" and "database or disk is full" in shown["unsaved"]
    disk.full = False  # space is back: the same read records it
    job = tunekit.get_job(rec.id).refresh()
    assert job.status == JobStatus.FAILED and "No space left on device" in job.error and job.unsaved is None


@pytest.mark.slow
def test_a_stopped_worker_is_shown_stalled_and_cancel_ends_it(tiny_model, data, monkeypatch, paced):
    from tunekit.job import progress_line

    train, _ = data
    with paced():
        job = tunekit.finetune(train, **_kw(tiny_model))
    _wait_for(job, lambda j: j.progress.get("last_checkpoint") and j.progress.get("step", 0) >= 5)
    os.kill(job.record.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # let a write that was under way land; then ten minutes of silence pass
        default_store().update_job(job.id, heartbeat_at=time.time() - 600)
        job.refresh()
        line = progress_line(job.record)
        assert job.status == JobStatus.RUNNING and "stalled: no heartbeat for 10m00s" in line and "ETA" not in line
        with pytest.raises(JobStateError, match=r"worker \(pid \d+\) is stalled \(no heartbeat for 10m"):
            job.resume()
        job.cancel()  # SIGTERM wakes it: it stops at the next step after a checkpoint
    finally:
        if worker_alive(job.record):
            os.kill(job.record.pid, signal.SIGCONT)
    job.wait(timeout=60)
    assert job.status == JobStatus.CANCELLED and not worker_alive(job.record)
    stopped_at = job.result.checkpoints[-1]["step"]
    assert 5 <= stopped_at < 16
    job.resume().wait(timeout=120)
    assert job.status == JobStatus.SUCCEEDED and job.result.metrics["steps"] == 16


def test_cancel_kills_a_hung_worker_that_ignores_sigterm(tiny_model, data, monkeypatch, capsys):
    from tunekit.backends.local import process
    from tunekit.cli.main import main
    from tunekit.job import progress_line

    monkeypatch.setattr(process, "KILL_GRACE_S", 1.0)
    train, _ = data
    store = default_store()
    rec = store.create_job("local", {"base_model": str(tiny_model)}, {"train": {"path": str(train)}})
    hung = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)",
                             "tunekit.backends.local.worker", rec.id], stdout=subprocess.PIPE, text=True)
    assert hung.stdout.readline() == "ready\n"
    try:
        rec = store.update_job(rec.id, status=JobStatus.RUNNING, pid=hung.pid, heartbeat_at=time.time() - 200,
                               progress={"step": 3, "total_steps": 16, "eta_s": 30})
        assert worker_alive(rec) and "stalled: no heartbeat for 3m20s" in progress_line(rec)
        assert main(["jobs", "status", rec.id, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["status"] == "running" and 200 <= shown["stalled_s"] < 260
        job = tunekit.get_job(rec.id).cancel()
        assert job.status == JobStatus.CANCELLED and hung.poll() == -signal.SIGKILL
        assert f"worker process {hung.pid} was stalled (no heartbeat for 3m2" in job.error
        assert job.error.endswith("ended with SIGKILL")
        with pytest.raises(JobStateError, match="no checkpoint"):  # gone: resume is no longer refused for it
            job.resume()
    finally:
        hung.kill()
        hung.wait()


# --------------------------------------------------------------------------------------- no training

def test_memory_refusal_happens_before_anything_is_spawned(data, tmp_path):
    train, _ = data
    big = tmp_path / "llama-70b-shape"  # config only: the fit check never loads weights
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}))
    with pytest.raises(ResourceError) as err:
        tunekit.finetune(train, base_model=str(big), backend="local", provider_options={"local": {"device": "cpu"}})
    assert "GiB" in str(err.value) and err.value.hint
    [record] = default_store().list_jobs()
    assert record.status == JobStatus.FAILED and record.pid is None and "ResourceError" in record.error
    assert not (job_dir(record.id) / "worker.log").exists()


def test_memory_budget_option_is_enforced(tiny_model, data):
    train, _ = data
    with pytest.raises(ResourceError, match="micro-batch 8"):
        tunekit.finetune(train, base_model=str(tiny_model), backend="local",
                         provider_options={"local": {"memory_budget_gb": 0.01}})
    assert default_store().list_jobs()[0].status == JobStatus.FAILED


def test_a_live_unrelated_process_is_not_taken_for_the_worker(tiny_model, data):
    train, _ = data
    store = default_store()
    rec = store.create_job("local", {"base_model": str(tiny_model)}, {"train": {"path": str(train)}})
    # our own pid is alive, but it is not this job's worker (pid reuse must not keep a dead job "running")
    rec = store.update_job(rec.id, status=JobStatus.RUNNING, pid=os.getpid(), heartbeat_at=time.time() - 30)
    assert not worker_alive(rec)
    job = tunekit.get_job(rec.id).refresh()
    assert job.status == JobStatus.FAILED and "vanished (last heartbeat 30s ago)" in job.error
    with pytest.raises(JobStateError, match="no checkpoint"):
        job.resume()


def test_cancel_of_a_job_whose_worker_is_gone_marks_it_cancelled(tiny_model, data):
    train, _ = data
    store = default_store()
    rec = store.create_job("local", {"base_model": str(tiny_model)}, {"train": {"path": str(train)}})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_job(rec.id, status=JobStatus.QUEUED, pid=dead.pid)
    job = tunekit.get_job(rec.id).cancel()
    assert job.status == JobStatus.CANCELLED


def test_a_data_file_changed_after_finetune_fails_the_job_untrained(tiny_model, data):
    train, _ = data
    job = tunekit.finetune(train, **_kw(tiny_model))
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:12]))  # 3 steps, not 16
    job.wait(timeout=60)
    assert job.status == JobStatus.FAILED
    assert job.error.startswith(f"ConfigError: the training file {train} changed after it was validated")
    assert "nothing was trained" in job.error and "tunekit finetune" in job.error
    assert job.metrics() == [] and job.result.checkpoints == []


def test_a_fact_the_plan_could_not_know_changes_the_run_and_is_shown(tiny_model, data, monkeypatch, capsys):
    """Planned while the base model's config.json was unreadable (a hub model not yet in the cache): no memory
    estimate, no speed plan. The worker can read it: it re-plans, records plan_changed, trains the new run."""
    import tunekit.backends.local.resolve as resolve_mod
    from tunekit.backends.base import PlanContext
    from tunekit.backends.local.backend import LocalBackend
    from tunekit.cli.main import main

    train, _ = data
    fields = _kw(tiny_model, max_steps=2)
    del fields["backend"]
    spec = TrainingSpec.model_validate(fields)
    backend = LocalBackend()
    with monkeypatch.context() as m:
        m.setattr(resolve_mod, "read_config", lambda base: (None, f"{base}: config.json not in the cache yet"))
        plan = backend.plan(spec, context=PlanContext(spec=spec, rows=ROWS))
    assert plan.request["memory_estimate"] is None and plan.request["speed"] is None
    store = default_store()
    rec = store.create_job("local", spec.model_dump(mode="json", exclude_unset=True),
                           {"train": {"path": str(train), "sha256": _sha256(train), "rows": ROWS}},
                           request=plan.request)
    backend.submit(rec, spec, plan)
    job = tunekit.get_job(rec.id).wait(timeout=120)
    assert job.status == JobStatus.SUCCEEDED, job.error

    [changed] = job.plan_changes
    changes = changed.data["changes"]
    assert changes["facts"] == {"config": ["unreadable", "read"]}
    assert changes["memory_estimate.total_bytes"][0] is None and changes["memory_estimate.total_bytes"][1] > 0
    assert changes["speed.checkpointed_layers"] == [None, 0]
    assert changes["training.checkpointing.layers"] == [None, "0/2"]
    assert changed.level == "warning" and changed.message.startswith("plan changed (config: unreadable -> read)")
    # the store now holds the run the worker trained, and that is the new one
    stored = LocalRun.model_validate(job.record.request)
    assert LocalRun.model_validate_json((job_dir(job.id) / "output" / "run.json").read_text()) == stored
    assert stored.memory_estimate.total_bytes == changes["memory_estimate.total_bytes"][1]
    assert main(["jobs", "status", job.id]) == 0
    assert "plan changed (config: unreadable -> read): " in capsys.readouterr().out
    assert main(["jobs", "status", job.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_changed"] == [changes]


def test_the_worker_trains_its_own_copy_of_the_validated_data(data, tmp_path):
    from tunekit.backends.local.run import DataFile

    train, val = data
    original = train.read_bytes()
    snapshots = tmp_path / "job" / "data"
    train_file = DataFile(source=str(train), path=str(snapshots / "train.jsonl"), sha256=_sha256(train))
    snap = data_snapshot(train_file, "train")
    assert snap == snapshots / "train.jsonl" and snap.read_bytes() == original
    val_file = DataFile(source=str(val), path=str(snapshots / "validation.jsonl"), sha256=_sha256(val))
    assert data_snapshot(val_file, "validation").read_bytes() == val.read_bytes()
    train.write_text("edited after the first start\n")
    assert data_snapshot(train_file, "train").read_bytes() == original  # a resume trains what was validated
    snap.write_bytes(original[:-10])
    with pytest.raises(ConfigError, match="changed after it was validated") as err:
        data_snapshot(train_file, "train")
    assert err.value.field == "data"
    unvalidated = DataFile(source=str(train), path=str(tmp_path / "other.jsonl"), sha256="")
    with pytest.raises(ConfigError, match="no validated sha256"):
        data_snapshot(unvalidated, "train")


def test_terminal_plot_and_png_from_rows(tmp_path):
    rows = [{"split": "train", "step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 21)]
    rows += [{"split": "eval", "step": s, "eval_loss": 2.9 - 0.1 * s} for s in (5, 10, 15, 20)]
    text = terminal_plot(rows, width=30, height=8)
    lines = text.splitlines()
    assert len(lines) == 8 + 3 and lines[0].strip().startswith("2.9 ") and lines[-2].split() == ["1", "20"]
    assert lines[0].index("*") == lines[0].index("|") + 1  # the highest loss is the first step: top-left
    assert lines[7].rstrip()[-1] in "*@"  # the lowest is the last step: bottom-right (@: both series)
    assert "o" in text
    assert terminal_plot([]) == "(no loss values logged yet)"
    png = plot_metrics(rows, tmp_path / "sub" / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_metrics([{"split": "train", "step": 1}], tmp_path / "x.png")


def test_cancel_before_the_first_step(tiny_model, data):
    train, _ = data
    job = tunekit.finetune(train, **_kw(tiny_model))
    job.cancel()  # the worker is still starting up
    job.wait(timeout=60)
    assert job.status == JobStatus.CANCELLED and "before the first step" in job.error
    assert job.metrics() == [] and job.result.checkpoints == []


def test_reconcile_reattaches_a_worker_whose_pid_was_not_recorded(tiny_model, data):
    train, _ = data
    store = default_store()
    rec = store.create_job("local", {"base_model": str(tiny_model)}, {"train": {"path": str(train)}})
    # a process that looks like this job's worker (same argv), spawned but never recorded
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "tunekit.backends.local.worker", rec.id])
    cmdline = Path(f"/proc/{fake.pid}/cmdline")
    deadline = time.monotonic() + 10  # a loaded machine may not have finished exec() when Popen returns
    while b"tunekit.backends.local.worker" not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        [job] = tunekit.api.reconcile(rec.id)
        assert job.record.pid == fake.pid and job.status == JobStatus.QUEUED
        assert worker_alive(job.record)
    finally:
        fake.kill()
        fake.wait()
    assert job.refresh().status == JobStatus.FAILED and "vanished" in job.error
