"""A test-only backend whose 'provider' is a JSON file, so several processes can see one remote job.

Each refresh advances the remote job one step along ``script`` (e.g. queued -> running -> succeeded).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from tunekit.backends import register_backend
from tunekit.backends.base import Backend, Refuse, Send
from tunekit.schemas.job import JobEvent, JobResult, JobStatus, RemoteState, map_status
from tunekit.schemas.spec import spec_leaf_fields

STATUS = {"pending": JobStatus.QUEUED, "training": JobStatus.RUNNING, "done": JobStatus.SUCCEEDED,
          "error": JobStatus.FAILED, "stopped": JobStatus.CANCELLED, "stopping": JobStatus.CANCELLING}


def _field_map():
    refused = {"adapter.use_dora": "fake has no DoRA", "adapter.init": "fake has no init choice",
               "quantization": "fake trains in full precision"}
    out = {}
    for path in spec_leaf_fields():
        if path in refused:
            out[path] = Refuse(refused[path])
        elif path == "hyperparameters.learning_rate":
            out[path] = Send("lr_multiplier", convert=lambda v, ctx: round(v / 1e-4, 6), note="relative to 1e-4")
        elif path == "hyperparameters.dpo_beta":
            out[path] = lambda spec: Send("beta") if spec.method == "dpo" else Refuse("only with method='dpo'")
        else:
            out[path] = Send(path.split(".")[-1])
    return out


class FakeBackend(Backend):
    name = "fake"
    field_map = _field_map()
    status_map = STATUS
    min_rows = 2

    def __init__(self, **options):
        super().__init__(**options)
        self.root = Path(os.environ["TUNEKIT_HOME"]) / "fake-provider"
        self.root.mkdir(parents=True, exist_ok=True)
        self.script = options.get("script", ["pending", "training", "training", "done"])

    def base_request(self, spec, ctx):
        return {"model": spec.base_model}

    def _path(self, remote_id):
        return self.root / f"{remote_id}.json"

    def _load(self, remote_id):
        return json.loads(self._path(remote_id).read_text())

    def _save(self, remote):
        self._path(remote["id"]).write_text(json.dumps(remote))

    def _state(self, remote):
        status = remote["script"][remote["pos"]]
        result = JobResult(model=f"fake:{remote['id']}") if status == "done" else None
        return RemoteState(remote_id=remote["id"], raw_status=status, status=map_status(STATUS, status),
                           result=result, error="boom" if status == "error" else None,
                           progress={"percent": 100 * remote["pos"] / max(len(remote["script"]) - 1, 1)})

    def submit(self, job, spec, plan):
        remote = {"id": "fk-" + uuid.uuid4().hex[:8], "tag": job.id, "request": plan.request,
                  "script": self.script, "pos": 0}
        self._save(remote)
        return self._state(remote)

    def refresh(self, job):
        remote = self._load(job.remote_id)
        remote["pos"] = min(remote["pos"] + 1, len(remote["script"]) - 1)
        self._save(remote)
        return self._state(remote)

    def cancel(self, job):
        remote = self._load(job.remote_id)
        remote["script"] = remote["script"][: remote["pos"] + 1] + ["stopping", "stopped"]
        self._save(remote)
        return self._state(remote)

    def events(self, job):
        remote = self._load(job.remote_id)
        events = [JobEvent(created_at=time.time(), message=f"remote at {remote['script'][i]}", remote_id=f"e{i}")
                  for i in range(remote["pos"] + 1)]
        if remote["script"][remote["pos"]] == "training":  # like OpenAI's metrics events
            events.append(JobEvent(created_at=time.time(), type="metrics", message=f"step {remote['pos']}",
                                   remote_id=f"m{remote['pos']}",
                                   data={"step": remote["pos"] * 10, "total_steps": 100, "train_loss": 1.0 / remote["pos"]}))
        return events

    def find_remote(self, job):
        for path in self.root.glob("*.json"):
            remote = json.loads(path.read_text())
            if remote["tag"] == job.id:
                return self._state(remote)
        return None

    def poll_interval(self, job):
        return (0.01, 0.05)


def register():
    register_backend("fake", "tests.fake_backend:FakeBackend")
