"""The SQLite store: WAL, 0600, migrations, two writing processes, events de-duplicated."""

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from tunekit._exceptions import AdapterNotFoundError, JobNotFoundError, StoreError
from tunekit.schemas.job import JobEvent, JobStatus
from tunekit.store import Store
from tunekit.store.migrations import MIGRATIONS


def test_file_mode_wal_and_schema_version(tunekit_home):
    store = Store()
    store.create_job("fake", {"base_model": "m"}, {})
    db = tunekit_home / "state.db"
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_newer_schema_is_refused(tunekit_home):
    Store().close()
    conn = sqlite3.connect(tunekit_home / "state.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.commit()
    with pytest.raises(StoreError, match="newer tunekit"):
        Store()


def test_status_change_writes_event_and_prefix_lookup():
    store = Store()
    job = store.create_job("fake", {}, {})
    store.update_job(job.id, status=JobStatus.RUNNING, raw_status="training")
    assert store.get_job(job.id[:8]).status == JobStatus.RUNNING
    messages = [e.message for _, e in store.events(job.id)]
    assert messages == ["job created", "status created -> running"]
    with pytest.raises(JobNotFoundError):
        store.get_job("tk-nope")


def test_provider_events_deduplicated():
    store = Store()
    job = store.create_job("fake", {}, {})
    ev = JobEvent(created_at=1.0, message="x", remote_id="ev-1")
    assert store.add_event(job.id, ev) is True
    assert store.add_event(job.id, ev) is False
    assert len(store.events(job.id)) == 2


WRITER = textwrap.dedent("""
    import sys
    from tunekit.store import Store
    from tunekit.schemas.job import JobEvent
    s = Store()
    for i in range(150):
        j = s.create_job("fake", {"i": i}, {"w": sys.argv[1]})
        s.add_event(j.id, JobEvent(created_at=float(i), message=f"{sys.argv[1]}-{i}"))
        s.add_metrics(j.id, i, {"loss": 1.0 / (i + 1)})
""")


def test_two_processes_write_at_once(tunekit_home):
    Store().close()  # create + migrate first so both writers start from the same schema
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name], env=os.environ.copy(),
                              stderr=subprocess.PIPE) for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    jobs = Store().list_jobs(limit=None)
    assert len(jobs) == 300
    assert {j.data["w"] for j in jobs} == {"a", "b"}


def test_adapter_registry_filters():
    store = Store()
    a = store.add_adapter(backend="local", location="/x", info={"r": 8}, base_model="b1", data_sha256="d1",
                          name="first")
    store.add_adapter(backend="openai", location="ft:model", info={}, base_model="b2")
    assert [x.id for x in store.list_adapters(base_model="b1")] == [a.id]
    assert store.get_adapter("first").id == a.id
    store.update_adapter(a.id, merge_check={"top1_agreement": 1.0})
    assert store.get_adapter(a.id).merge_check == {"top1_agreement": 1.0}
    store.remove_adapter(a.id)
    assert len(store.list_adapters()) == 1
    with pytest.raises(AdapterNotFoundError, match="no adapter") as info:  # not a missing job
        store.get_adapter(a.id)
    assert not isinstance(info.value, JobNotFoundError) and "tunekit adapters list" in info.value.hint


def test_compare_and_set_refuses_a_stale_status():
    from tunekit.store.db import StaleWriteError

    store = Store()
    job = store.create_job("fake", {}, {})
    store.update_job(job.id, status=JobStatus.RUNNING)  # e.g. the worker, meanwhile
    with pytest.raises(StaleWriteError):
        store.update_job(job.id, expect_status=JobStatus.CREATED, status=JobStatus.QUEUED)
    assert store.get_job(job.id).status == JobStatus.RUNNING


def test_apply_rereads_instead_of_overwriting_a_concurrent_status(monkeypatch):
    """A backend view computed before the worker wrote 'succeeded' must not win."""
    from tunekit.job import FineTuneJob
    from tunekit.schemas.job import RemoteState

    store = Store()
    rec = store.create_job("fake", {}, {})
    store.update_job(rec.id, status=JobStatus.RUNNING)
    job = FineTuneJob(store.get_job(rec.id), store=store)
    real_get = store.get_job
    calls = {"n": 0}

    def racing_get(job_id):
        calls["n"] += 1
        if calls["n"] == 1:  # the worker finishes right after apply() read the row
            snapshot = real_get(job_id)
            store.update_job(job_id, status=JobStatus.SUCCEEDED)
            return snapshot
        return real_get(job_id)

    monkeypatch.setattr(store, "get_job", racing_get)
    job.apply(RemoteState(status=JobStatus.FAILED, error="stale view"))
    assert real_get(rec.id).status == JobStatus.SUCCEEDED and job.status == JobStatus.SUCCEEDED


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096])
def test_an_existing_file_that_is_no_database_is_refused(tunekit_home, content):
    tunekit_home.mkdir()
    db = tunekit_home / "state.db"
    db.write_bytes(content)
    with pytest.raises(StoreError, match="truncated or overwritten") as err:
        Store()
    assert str(db) in str(err.value) and f"mv {db}" in err.value.hint
    assert db.read_bytes() == content


def test_a_store_that_fails_while_being_created_leaves_nothing(tunekit_home, monkeypatch):
    """So the next open starts a new store instead of finding an empty file it must refuse."""
    def crash(self):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(Store, "_migrate", crash)
        with pytest.raises(StoreError, match="disk I/O error"):
            Store()
    assert list(tunekit_home.iterdir()) == []
    Store().create_job("fake", {}, {})


def test_processes_creating_the_store_at_once_all_open_it(tunekit_home):
    code = "from tunekit.store import Store; Store().create_job('fake', {}, {})"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(), stderr=subprocess.PIPE)
             for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert len(Store().list_jobs()) == 3
    assert sorted(p.name for p in tunekit_home.iterdir() if not p.name.startswith("state.db")) == []


def test_a_store_cut_short_is_called_damaged(tunekit_home):
    store = Store()
    for _ in range(20):
        store.create_job("fake", {"base_model": "m" * 2000}, {})
    store.close()
    db = tunekit_home / "state.db"
    os.truncate(db, db.stat().st_size // 2)
    with pytest.raises(StoreError, match="is damaged") as err:
        Store()
    assert f"mv {db} {db}.broken" in err.value.hint
