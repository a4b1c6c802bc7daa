"""tunekit eval of a managed fine-tune, by its tunekit job id, on each managed backend: the fine-tuned model
name comes from the store (the registry entry the finished job wrote), the answers from the provider's
inference API through its official SDK, replayed from tests/recordings/<provider>/eval_chat.json. Every
request the SDK sent and every response served is checked against the provider's spec (tests/specs/;
Fireworks: its SDK's types); the recorded 429 is retried under the one retry policy."""

from __future__ import annotations

import json

import pytest

from tests.conftest_fireworks import check_exchange
from tests.conftest_together import unexplained
from tests.replay.fixtures import RECORDINGS, replay_server  # noqa: F401  (fixture)
from tests.replay.spec_check import check_server, load_provider_spec

pytest.importorskip("openai")

ROWS = [{"prompt": "capital of France?", "response": "Paris"}, {"prompt": "2+2?", "response": "4"}]

# provider -> (the SDK's module, its base-URL variable, the path prefix that variable omits, error schema)
PROVIDERS = {
    "openai": ("openai", "OPENAI_BASE_URL", "/v1", "ErrorResponse"),
    "together": ("together", "TOGETHER_BASE_URL", "", "ErrorData"),
    "fireworks": ("fireworks", "FIREWORKS_BASE_URL", "", None),
}


def _spec_problems(provider: str, srv) -> list[str]:
    if provider == "openai":
        return check_server(load_provider_spec("openai"), srv, error_schema="ErrorResponse")
    if provider == "together":
        return unexplained(check_server(load_provider_spec("together"), srv, error_schema="ErrorData"))[0]
    problems = [p for r in srv.requests for p in check_exchange(r.method, r.path, r.query or None, r.json, None, None)]
    return problems + [p for e in srv.exchanges for p in check_exchange(
        e["request"]["method"], e["request"]["path"], None, None, e["response"]["status"], e["response"]["json"])]


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_a_managed_job_is_evaluated_at_its_provider(provider, replay_server, tmp_path, monkeypatch):  # noqa: F811
    sdk, url_var, prefix, _ = PROVIDERS[provider]
    pytest.importorskip(sdk)
    import tunekit
    from tunekit.job import FineTuneJob
    from tunekit.schemas.job import JobResult, JobStatus, RemoteState
    from tunekit.store import default_store

    recording = json.loads((RECORDINGS / provider / "eval_chat.json").read_text())
    model = recording["exchanges"][0]["request"]["json"]["model"]
    srv = replay_server(recording)
    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(f"{provider.upper()}_API_KEY", f"sk-{provider}-test")
    monkeypatch.setenv(url_var, srv.url + prefix)
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    # A job the provider reported finished: FineTuneJob.apply registers its fine-tuned model.
    store = default_store()
    record = store.create_job(provider, {"base_model": "some-base"}, {})
    FineTuneJob(record, store=store).apply(RemoteState(remote_id="remote-1", raw_status="succeeded",
                                                       status=JobStatus.SUCCEEDED, result=JobResult(model=model)))
    notices: list[tuple[str, int]] = []
    result = tunekit.evaluate([record.id], data, metrics=["exact_match", "contains"], max_tokens=8, concurrency=1,
                              on_notice=lambda msg: notices.append((msg, len(srv.requests))))

    srv.assert_done()  # the 429 and every row's 200, in order: one retry, nothing asked twice
    assert _spec_problems(provider, srv) == []
    assert {r.headers.get("user-agent", "").split("/")[0].lower() for r in srv.requests} == {sdk}  # its own SDK
    [target] = result.targets
    assert target.kind == "remote" and target.adapter_id == store.get_adapter(record.id).id
    assert [r["answers"][record.id] for r in result.rows] == ["Paris", "5"]
    assert target.metrics == {"exact_match": 0.5, "contains": 0.5}
    assert [(m.split(", about")[0], seen) for m, seen in notices] == [("2 generation call(s) to 1 remote target(s)", 0)]
    assert store.get_adapter(record.id).info["evals"][-1]["metrics"] == {"exact_match": 0.5, "contains": 0.5}


def test_a_missing_provider_sdk_names_the_extra(monkeypatch):
    import sys

    from tunekit import MissingDependencyError
    from tunekit.eval.run import _remote_client
    from tunekit.eval.targets import Target

    monkeypatch.setitem(sys.modules, "fireworks", None)  # as if not installed: importing it raises ImportError
    target = Target("ft", "remote", "accounts/a/models/m", api_key="k", provider="fireworks")
    with pytest.raises(MissingDependencyError) as info:
        _remote_client(target)
    assert info.value.hint == "pip install 'tunekit[fireworks]'"
