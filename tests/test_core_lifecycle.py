"""finetune -> store -> refresh/wait/cancel/events with the fake backend, across processes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tunekit
from tunekit.schemas.job import JobStatus
from tunekit.store import Store
from tests.conftest import EXAMPLES
from tests.fake_backend import register

register()
TRAIN = EXAMPLES / "data" / "train.jsonl"


def test_full_lifecycle_succeeds():
    job = tunekit.finetune(TRAIN, base_model="m", backend="fake", hyperparameters={"epochs": 2})
    assert job.status == JobStatus.QUEUED and job.raw_status == "pending"
    record = Store().get_job(job.id)
    assert record.data["train"]["rows"] > 0 and len(record.data["train"]["sha256"]) == 64
    assert record.request["epochs"] == 2
    job.wait(timeout=10, progress=False)
    assert job.status == JobStatus.SUCCEEDED
    assert job.result.model.startswith("fake:")
    entry = Store().get_adapter(job.result.registry_id)  # managed results land in the adapter registry
    assert entry.location == job.result.model and entry.job_id == job.id
    assert entry.data_sha256 == record.data["train"]["sha256"]
    messages = [e.message for _, e in job.events()]
    assert "remote at done" in messages and "status running -> succeeded" in messages
    remote_ids = [e.remote_id for _, e in job.events() if e.remote_id]
    assert remote_ids == ["e0", "e1", "m1", "e2", "m2", "e3"]  # each provider event stored once, in order


def test_provider_metrics_events_feed_the_progress_line():
    from tunekit.job import progress_line

    job = tunekit.finetune(TRAIN, base_model="m", backend="fake")
    job.refresh()  # remote now "training" with a metrics event at step 10
    assert job.progress["step"] == 10 and job.progress["total_steps"] == 100 and job.progress["loss"] == 1.0
    line = progress_line(job.record)
    assert "10/100" in line and "loss 1.0000" in line
    job.wait(timeout=10, progress=False)
    # the same events become step metrics, for `tunekit jobs metrics ID --plot` on a managed job
    assert [(m["split"], m["step"], m["loss"]) for m in job.metrics()] == [("train", 10, 1.0), ("train", 20, 0.5)]


def test_invalid_data_never_reaches_backend(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(tunekit.DataValidationError) as exc:
        tunekit.finetune(bad, base_model="m", backend="fake")
    assert exc.value.report.problems[0].line == 2
    assert Store().list_jobs() == []
    assert not list((tmp_path.parent / "tunekit-home" / "fake-provider").glob("*.json"))


def test_too_few_rows_for_backend(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(tunekit.DataValidationError) as exc:
        tunekit.finetune(one, base_model="m", backend="fake")
    assert any(p.code == "too_few_rows" for p in exc.value.report.problems)


def test_unsupported_field_refused_before_any_row_is_written():
    with pytest.raises(tunekit.UnsupportedFieldError):
        tunekit.finetune(TRAIN, base_model="m", backend="fake", adapter={"use_dora": True})
    assert Store().list_jobs() == []


def test_unknown_provider_status_is_unknown_not_guessed():
    job = tunekit.finetune(TRAIN, base_model="m", backend="fake",
                           backend_options={"script": ["pending", "weird_new_state", "done"]})
    job.refresh()
    assert job.status == JobStatus.UNKNOWN and job.raw_status == "weird_new_state"
    job.wait(timeout=10, progress=False)
    assert job.status == JobStatus.SUCCEEDED


def test_cancel_and_terminal_status_is_final():
    job = tunekit.finetune(TRAIN, base_model="m", backend="fake",
                           backend_options={"script": ["pending", "training", "training", "training", "done"]})
    job.refresh()
    job.cancel()
    job.wait(timeout=10, progress=False)
    assert job.status == JobStatus.CANCELLED
    with pytest.raises(tunekit.JobStateError):
        job.cancel()


def test_wait_timeout():
    job = tunekit.finetune(TRAIN, base_model="m", backend="fake",
                           backend_options={"script": ["pending"] + ["training"] * 1000})
    with pytest.raises(tunekit.WaitTimeout):
        job.wait(timeout=0.2, poll_interval=0.05, progress=False)


def test_submit_crash_is_reconciled(monkeypatch):
    from tests.fake_backend import FakeBackend

    real_submit = FakeBackend.submit

    def submit_then_die(self, job, spec, plan):
        real_submit(self, job, spec, plan)  # the provider created it ...
        raise tunekit.APIConnectionError("connection dropped", provider="fake")  # ... but we never heard

    monkeypatch.setattr(FakeBackend, "submit", submit_then_die)
    with pytest.raises(tunekit.APIConnectionError):
        tunekit.finetune(TRAIN, base_model="m", backend="fake")
    (record,) = Store().list_jobs()
    assert record.status == JobStatus.UNKNOWN and "reconcile" in record.error
    (job,) = tunekit.reconcile()
    assert job.remote_id and job.remote_id.startswith("fk-")


OTHER_PROCESS = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {root!r})
    from tests.fake_backend import register
    register()
    import tunekit
    job = tunekit.get_job(sys.argv[1])
    job.wait(timeout=30, progress=False)
    print(json.dumps({{"status": job.status.value, "model": job.result.model}}))
""")


def test_job_created_here_is_waited_on_in_another_process():
    from tests.conftest import ROOT

    job = tunekit.finetune(TRAIN, base_model="m", backend="fake")
    out = subprocess.run([sys.executable, "-c", OTHER_PROCESS.format(root=str(ROOT)), job.id],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["status"] == "succeeded"
    assert tunekit.get_job(job.id).result.model == seen["model"]
