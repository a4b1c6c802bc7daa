"""Helpers for the Together tests: recordings, a pinned tunekit job id, and the spec divergences we accept.

Imported by tests/test_together_*.py (``from tests.conftest_together import ...``).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from tests.replay.fixtures import RECORDINGS, replay_server  # noqa: F401  (re-exported fixture)

TOGETHER = RECORDINGS / "together"
JOB_ID = "tk-0123456789ab"          # the tunekit job id the recordings' tags carry
FT = "ft-3b5e2f41-7c1d-4b8e-9a61-2f0c5d7e8a90"
MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
TRAIN_FILE = "file-6a1f0c9e-2b3d-4e5f-8a7b-9c0d1e2f3a4b"
VALID_FILE = "file-0b9c8d7e-6f5a-4b3c-2d1e-0f9a8b7c6d5e"

# Where the public spec (togethercomputer/openapi@090263aa) lags SDK 3.1.1, each allowed problem with why.
# Every pattern must still match something (test_together_spec), so a fixed spec retires its entry.
DIVERGENCES: dict[str, str] = {
    r"^POST /v1/files: no such operation in the spec$":
        "SDK uploads via POST /v1/files -> 302 presigned URL; the spec has only POST /files/upload",
    r"^PUT /presigned/[\w-]+: no such operation in the spec$":
        "the presigned storage URL is not Together's API",
    r"^POST /v1/files/[\w-]+/preprocess: no such operation in the spec$":
        "the SDK's post-upload step, absent from the spec",
    r"^GET /fine-tunes/models/limits -> 200 response(\['lora_training'\])?\['(default_rank|max_num_checkpoints|"
    r"default_gradient_accumulation_steps|max_seq_length_sft|max_seq_length_dpo|min_max_seq_length|"
    r"supports_full_training)'\]: key not in the spec schema$":
        "fields of the SDK's FinetuneModelLimits the spec schema lacks",
    r"lr_scheduler'\]\['lr_scheduler_args'\]: \{'min_lr_ratio': [\d.]+, 'num_cycles': [\d.]+\} is valid under each of":
        "spec defect: cosine args also match the open LinearLRSchedulerArgs in a oneOf",
    r"^GET /fine-tunes/\{id\} -> 200 response\['(steps_completed|total_steps)'\]: key not in the spec schema$":
        "progress counters of the SDK's hand-written FinetuneResponse",
    r"^POST /fine-tunes request body\['early_stopping_enabled'\]: key not in the spec schema$":
        "SDK 3.1.1 always sends early_stopping_enabled; the spec predates early stopping",
}


def unexplained(problems: list[str]) -> tuple[list[str], set[str]]:
    """(problems no divergence explains, the divergence patterns that matched)."""
    used: set[str] = set()
    left = []
    for problem in problems:
        hits = [p for p in DIVERGENCES if re.search(p, problem)]
        used.update(hits)
        if not hits:
            left.append(problem)
    return left, used


def recording(name: str) -> dict:
    return json.loads((TOGETHER / f"{name}.json").read_text())


@pytest.fixture
def pinned_job_id(monkeypatch):
    """Make the next tunekit job id JOB_ID, so the recorded list responses carry its tag."""
    monkeypatch.setattr("tunekit.store.db.new_job_id", lambda: JOB_ID)
    return JOB_ID


@pytest.fixture
def together_env(monkeypatch, replay_server):  # noqa: F811
    """start(name) -> a replay server for tests/recordings/together/<name>.json, with TOGETHER_* pointing at it
    and a canary API key (returned as server.api_key)."""
    def start(name: str | dict):
        server = replay_server(TOGETHER / f"{name}.json" if isinstance(name, str) else name)
        key = f"sk-canary-{uuid.uuid4().hex}"
        monkeypatch.setenv("TOGETHER_API_KEY", key)
        monkeypatch.setenv("TOGETHER_BASE_URL", server.url)
        monkeypatch.setenv("TUNEKIT_CREATE_LOOKUP_S", "0")  # the recordings' lists show a new job at once
        server.api_key = key
        return server
    return start


def sent(server, method: str, path: str) -> list:
    return [r for r in server.requests if r.method == method and r.path == path]


def rows_of(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "data"
