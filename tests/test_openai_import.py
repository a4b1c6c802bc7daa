"""tunekit import openai: recorded list (two pages)/retrieve/files content/events/checkpoints through the real
openai SDK, every request and response checked against OpenAI's spec; deleted files; importing twice."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")

from tests.conftest import EXAMPLES  # noqa: E402
from tests.conftest_openai import MODEL, RECORDINGS, options, sha256  # noqa: E402
from tests.replay.fixtures import replay_server  # noqa: E402,F401
from tests.replay.spec_check import check_server, load_provider_spec  # noqa: E402
from tunekit.schemas.job import JobStatus  # noqa: E402
from tunekit.store import default_store  # noqa: E402


def _import(srv, *ids, **kw):
    import tunekit

    opts = options(srv)
    return tunekit.import_openai(list(ids), api_key=opts.pop("api_key"), base_url=opts.pop("base_url"),
                                 backend_options=opts, **kw)


def _spec_problems(srv):
    return check_server(load_provider_spec("openai"), srv, error_schema="ErrorResponse")


def test_import_all_pages_files_events_metrics_registry(replay_server):
    srv = replay_server(RECORDINGS / "import_all.json")
    jobs = _import(srv, all_jobs=True)
    srv.assert_done()
    assert _spec_problems(srv) == []
    assert [srv.requests[i].query.get("after") for i in (0, 1)] == [None, "ftjob-ImpB0002"]  # paginated
    a, b, c = jobs
    store = default_store()

    # A: succeeded supervised job with its spec, files kept with their hash, events, metrics, registry entry.
    assert (a.backend_name, a.remote_id, a.status, a.raw_status) == ("openai", "ftjob-ImpA0001",
                                                                     JobStatus.SUCCEEDED, "succeeded")
    model = f"ft:{MODEL}:org-tunekit:sqlbot:AbC123xy"
    assert a.result.model == model and [c_["step"] for c_ in a.result.checkpoints] == [2, 3]
    spec = a.record.spec
    assert spec["base_model"] == MODEL and spec["method"] == "sft" and spec["suffix"] == "sqlbot"
    assert spec["hyperparameters"] == {"epochs": 3, "batch_size": 1, "seed": 11}
    assert spec["provider_options"] == {"openai": {"learning_rate_multiplier": 1.8}}
    train, valid = a.record.data["train"], a.record.data["validation"]
    chat = (EXAMPLES / "data" / "chat.jsonl").read_text().splitlines()
    from pathlib import Path

    assert Path(train["path"]).read_text().splitlines() == chat[:12]
    assert train["sha256"] == sha256(Path(train["path"])) and train["rows"] == 12 and train["kind"] == "chat"
    assert train["provider_file"] == "file-impA-train" and valid["rows"] == 4
    assert Path(train["path"]).is_relative_to(Path(store.path).parent / "imports" / "openai" / "ftjob-ImpA0001")
    assert spec["validation_data"] == valid["path"]
    provider_events = [e.remote_id for _, e in store.events(a.id) if e.remote_id]
    assert provider_events == ["ftevent-a0", "ftevent-a1", "ftevent-a2", "ftevent-a3"]  # both pages, oldest first
    metrics = {(m["split"], m["step"]): m for m in store.metrics(a.id)}
    assert metrics[("train", 1)]["loss"] == 1.9 and metrics[("train", 2)]["loss"] == 1.2
    assert metrics[("eval", 3)]["loss"] == 0.9 and ("eval", 2) in metrics  # CSV + checkpoint metrics
    (entry,) = store.list_adapters(backend="openai", data_sha256=train["sha256"])
    assert entry.location == model and entry.job_id == a.id

    # B: a cancelled DPO job: method and beta carried, no result.
    assert b.status is JobStatus.CANCELLED and b.result is None
    assert b.record.spec["method"] == "dpo" and b.record.spec["hyperparameters"]["dpo_beta"] == 0.2
    assert b.record.data["train"]["kind"] == "preference"

    # C: its files were deleted: imported with a note, data marked missing, model still registered.
    assert c.status is JobStatus.SUCCEEDED and c.record.data["train"] == {"provider_file": "file-impC-train",
                                                                          "missing": True}
    notes = [e.message for _, e in store.events(c.id) if e.level == "warning"]
    assert any("file-impC-train" in n and "404" in n and "tunekit distill" in n for n in notes), notes
    assert any("file-impC-results" in n for n in notes)
    assert store.get_adapter(c.id).location.endswith("::ZzZ99999")
    assert "suffix" not in c.record.spec


def test_import_again_updates_never_duplicates(replay_server):
    srv = replay_server(RECORDINGS / "import_again.json")
    (first,) = _import(srv, "ftjob-Again0001")
    assert first.status is JobStatus.RUNNING and default_store().list_adapters() == []
    assert first.record.spec["hyperparameters"] == {"seed": 42}  # OpenAI's 'auto' is not a value
    (second,) = _import(srv, "ftjob-Again0001")
    srv.assert_done()  # the second import downloaded nothing
    assert _spec_problems(srv) == []
    assert second.id == first.id and second.status is JobStatus.SUCCEEDED
    assert second.record.spec["hyperparameters"] == {"epochs": 3, "batch_size": 1, "seed": 42}
    assert second.record.spec["provider_options"] == {"openai": {"learning_rate_multiplier": 1.8}}
    store = default_store()
    assert [j.id for j in store.list_jobs(limit=None)] == [first.id]
    assert [e.remote_id for _, e in store.events(first.id) if e.remote_id] == ["ftevent-g1", "ftevent-g2"]
    (entry,) = store.list_adapters()
    assert entry.location.endswith(":again:AbC123xy")


def test_import_needs_ids_or_all():
    import tunekit

    with pytest.raises(tunekit.ConfigError, match="not both or neither"):
        tunekit.import_openai([], api_key="sk-x")


def test_cli_import_and_jobs_list(replay_server, capsys):
    from tunekit.cli.main import main

    srv = replay_server(RECORDINGS / "import_again.json")
    srv.exchanges[:] = srv.exchanges[:3]
    env = {"OPENAI_BASE_URL": srv.url + "/v1", "OPENAI_API_KEY": "sk-test", "TUNEKIT_MAX_RETRIES": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["import", "openai", "ftjob-Again0001", "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["remote_id"] == "ftjob-Again0001" and row["status"] == "running"
        assert main(["jobs", "list"]) == 0
        assert row["id"] in capsys.readouterr().out
    srv.assert_done()


def test_raw_bodies_are_checked_against_the_spec():
    """The check of a file's raw content is not vacuous: a raw body where the spec wants an object fails."""
    from tests.replay.spec_check import check_recording

    spec = load_provider_spec("openai")
    bad = {"exchanges": [{"request": {"method": "GET", "path": "/v1/fine_tuning/jobs/ftjob-1"},
                          "response": {"status": 200, "body": "not a job"}}]}
    assert check_recording(spec, bad) != []
