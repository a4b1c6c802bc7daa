"""Helpers for the OpenAI backend tests (imported by tests/test_openai_*.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, ROOT

RECORDINGS = ROOT / "tests" / "recordings" / "openai"
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)   # before the 2027-01-06 shutdown
MODEL = "gpt-4o-mini-2024-07-18"
TRAIN = EXAMPLES / "data" / "train.jsonl"            # prompt/response rows (converted to chat)
CHAT = EXAMPLES / "data" / "chat.jsonl"
PREFERENCE = EXAMPLES / "data" / "preference.jsonl"


def fast_policy():
    from tunekit._retry import RetryPolicy

    # lookup_window=0: the recordings' lists show a new job at once (one look); tests of a lagging list set it.
    return RetryPolicy(initial=0.01, max_wait=0.05, lookup_window=0)


def options(srv: Any, **extra: Any) -> dict[str, Any]:
    """Backend options pointing the SDK at the replay server, with a pinned clock and fast retries."""
    return {"base_url": srv.url + "/v1", "api_key": "sk-test-key", "clock": lambda: NOW,
            "retry_policy": fast_policy(), **extra}


def make_backend(srv: Any, **extra: Any):
    from tunekit.backends.openai.backend import OpenAIBackend

    return OpenAIBackend(**options(srv, **extra))


@pytest.fixture
def pin_job_id(monkeypatch):
    """Recordings carry fixed tunekit ids in their metadata tags: make the store hand out that id."""
    def pin(job_id: str) -> None:
        monkeypatch.setattr("tunekit.store.db.new_job_id", lambda: job_id)
    return pin


def finetune(srv: Any, data: Path, *, backend: Any = None, **kwargs: Any):
    """tunekit.finetune on the openai backend against ``srv``; the shutdown warning is expected."""
    import tunekit
    from tunekit.backends.openai.backend import OpenAIShutdownWarning

    opts = options(srv)
    api_key, base_url = opts.pop("api_key"), opts.pop("base_url")
    kwargs.setdefault("base_model", "gpt-4o-mini")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            job = tunekit.finetune(data, backend="openai", api_key=kwargs.pop("api_key", api_key), base_url=base_url,
                                   backend_options={**opts, **kwargs.pop("backend_options", {})}, **kwargs)
        finally:
            shutdown = [w for w in caught if issubclass(w.category, OpenAIShutdownWarning)]
    assert len(shutdown) == 1, [str(w.message) for w in caught]
    return job


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def converted(src: Path, tmp: Path, kind: str) -> Path:
    from tunekit.data.convert import convert_file

    out = tmp / f"expected-{kind}.jsonl"
    convert_file(src, out, kind)
    return out


def load(name: str) -> dict:
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def spec_problems(srv: Any) -> list[str]:
    """Every request the SDK sent and every response served, against the vendored OpenAPI spec."""
    from tests.replay.spec_check import check_server, load_provider_spec

    return check_server(load_provider_spec("openai"), srv, error_schema="ErrorResponse")
