"""tunekit.adapters.resolve: one resolver for serve, eval, export, merge and `tunekit adapters`.

Each reference that names no adapter (an unknown id, a job without an adapter yet, a directory that does
not exist, a registry entry whose directory is gone) raises AdapterNotFoundError the same way through
every entry point: the Python API and the CLI (exit 2, one line naming `tunekit adapters list`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunekit
from tunekit import AdapterNotFoundError, ConfigError
from tunekit.adapters.resolve import find_entry, locate, may_name_a_model, resolve_adapter
from tunekit.cli.main import main
from tunekit.schemas.job import JobStatus
from tunekit.store import default_store

from tests.test_cli import assert_one_line, run_cli

BASE = "meta-llama/Llama-3.1-8B-Instruct"
LIST_HINT = "`tunekit adapters list`"


def adapter_dir(root: Path, name: str = "ad", **config) -> Path:
    """An adapter directory as PEFT writes it (config + a valid one-float safetensors file; no torch needed)."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": BASE,
           "target_modules": ["q_proj", "v_proj"], **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    return d


def running_job() -> str:
    store = default_store()
    job = store.create_job("local", {"base_model": BASE}, {})
    store.update_job(job.id, status=JobStatus.RUNNING)
    return job.id


@pytest.fixture
def missing(tmp_path):
    """ref -> what the error says, for each way a reference can name no adapter."""
    gone = default_store().add_adapter(backend="local", location=str(tmp_path / "deleted"), info={},
                                       name="gone", base_model=BASE)
    job = running_job()
    return {
        "ad-0123456789ab": "ad-0123456789ab does not exist: it is neither an adapter directory nor an adapter in "
                           "the registry",
        job: f"job {job} has no adapter: it is running",
        str(tmp_path / "runs" / "sql"): f"{tmp_path / 'runs' / 'sql'} does not exist: it is neither",
        "gone": f"registry adapter {gone.id} points to {tmp_path / 'deleted'}, which is not on this machine",
    }


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "response": "4"}) + "\n")
    return path


# -- the resolver ----------------------------------------------------------------------------------------

def test_a_reference_resolves_by_directory_id_prefix_name_or_job(tmp_path):
    d = adapter_dir(tmp_path)
    job = default_store().create_job("local", {"base_model": BASE}, {})
    entry = default_store().add_adapter(backend="local", location=str(d), info={}, job_id=job.id, name="sql")
    assert resolve_adapter(d) == (d, None)
    for key in (entry.id, entry.id[:8], "sql", job.id):
        path, record = resolve_adapter(key)
        assert path == d and record.id == entry.id
    managed = default_store().add_adapter(backend="together", location="acme/model-x", info={}, name="remote")
    assert locate("remote").path is None and locate("remote").record.id == managed.id
    with pytest.raises(ConfigError, match="together model acme/model-x, which is not on this machine") as err:
        resolve_adapter("remote")
    assert not isinstance(err.value, AdapterNotFoundError) and LIST_HINT in err.value.hint


@pytest.mark.parametrize("status,hint", [
    (JobStatus.QUEUED, "wait for it (`tunekit jobs wait"),
    (JobStatus.FAILED, "says why it ended"),
    (JobStatus.SUCCEEDED, "its entry was removed from the registry"),
])
def test_a_job_without_an_adapter_says_what_the_job_is_doing(status, hint):
    store = default_store()
    job = store.create_job("local", {"base_model": BASE}, {})
    store.update_job(job.id, status=status)
    with pytest.raises(AdapterNotFoundError, match=f"job {job.id} has no adapter: it is {status.value}") as err:
        find_entry(job.id)
    assert hint in err.value.hint and LIST_HINT in err.value.hint and err.value.field == "adapter"


def test_what_may_name_a_model_and_what_can_only_name_an_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    assert may_name_a_model(BASE) and may_name_a_model("gpt2") and may_name_a_model("models/base")
    assert not may_name_a_model(adapter_dir(tmp_path))
    # a path, a tunekit id or a job names an adapter or nothing: never a hub model to download
    for ref in ("runs/sql", "./sql", str(tmp_path / "nowhere"), "~/nowhere", "ad-0123abcd", "tk-0123abcd",
                running_job()):
        assert not may_name_a_model(ref), ref
    default_store().add_adapter(backend="local", location=str(tmp_path), info={}, name="gpt2-sql")
    assert not may_name_a_model("gpt2-sql")


def test_the_error_is_exported_and_is_a_config_error():
    assert tunekit.AdapterNotFoundError is AdapterNotFoundError and issubclass(AdapterNotFoundError, ConfigError)
    assert LIST_HINT in AdapterNotFoundError("x").hint


# -- the same error through every Python entry point -----------------------------------------------------

def _serve_vllm(ref, tmp_path, data):
    from tunekit.serve import plan_vllm

    plan_vllm(BASE, {"a": ref})


def _serve_embedded(ref, tmp_path, data):
    from tunekit.serve import serve

    serve(BASE, {"a": ref}, engine="embedded", block=False)  # refused before the base is loaded


def _eval(ref, tmp_path, data):
    tunekit.evaluate([ref], data, record=False)


def _export(ref, tmp_path, data):
    pytest.importorskip("gguf")
    from tunekit.export import export_model

    export_model(ref, tmp_path / "out.gguf")


def _merge(ref, tmp_path, data):
    from tunekit.adapters.merge import merge_adapter

    merge_adapter(ref, tmp_path / "merged")


@pytest.mark.parametrize("call", [_serve_vllm, _serve_embedded, _eval, _export, _merge])
def test_python_api_raises_adapter_not_found(call, missing, tmp_path, data):
    for ref, says in missing.items():
        with pytest.raises(AdapterNotFoundError) as err:
            call(ref, tmp_path, data)
        assert says in err.value.message and LIST_HINT in err.value.hint, (ref, err.value)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.gguf").exists()


# -- and through the CLI: exit 2, one line with the hint -------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["serve", "{ref}", "--dry-run", "--engine", "embedded"],
    ["serve", "{ref}", "--dry-run", "--engine", "vllm"],
    ["serve", BASE, "--adapter", "a={ref}", "--dry-run", "--engine", "vllm"],
    ["eval", "{ref}", "--data", "{data}", "--no-record"],
    ["export", "{ref}", "--out", "{tmp}/out.gguf"],
    ["merge", "{ref}", "--out", "{tmp}/merged"],
    ["adapters", "show", "{ref}"],
], ids=lambda argv: " ".join(a for a in argv[:3] if not a.startswith("{")))
def test_cli_gives_one_line_and_exit_2(argv, missing, capsys, tmp_path, data):
    for ref, says in missing.items():
        if argv[:2] == ["adapters", "show"] and ref == "gone":
            continue  # its registry entry exists: `adapters show` shows it
        code, out, err = run_cli(capsys, *(a.format(ref=ref, data=data, tmp=tmp_path) for a in argv))
        assert code == 2 and "would serve" not in out, (ref, err)
        assert_one_line(err, says, LIST_HINT)


def test_adapters_rm_and_compare_use_the_same_resolver(capsys):
    job = running_job()
    for argv in (["adapters", "rm", job], ["adapters", "compare", job, job]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        assert_one_line(err, f"job {job} has no adapter: it is running", LIST_HINT)


# -- serve's BASE position -------------------------------------------------------------------------------

def test_serve_job_serves_its_adapter_over_its_base(capsys, tmp_path):
    d = adapter_dir(tmp_path, "sql")
    job = default_store().create_job("local", {"base_model": BASE}, {})
    default_store().add_adapter(backend="local", location=str(d), info={}, job_id=job.id, base_model=BASE)
    for ref, name in ((job.id, job.id), (str(d), "sql")):
        code, out, _ = run_cli(capsys, "serve", ref, "--dry-run", "--engine", "vllm", "--json")
        plan = json.loads(out)
        assert code == 0 and plan["base_model"] == BASE and plan["adapters"] == {name: str(d.resolve())}


def test_serve_refuses_an_adapter_as_base_and_an_adapter_without_a_base(capsys, tmp_path):
    d = adapter_dir(tmp_path, "sql")
    code, _, err = run_cli(capsys, "serve", str(d), "--adapter", f"x={d}", "--dry-run", "--engine", "vllm")
    assert code == 2
    assert_one_line(err, f"{d} is an adapter, not a base model", "--adapter NAME=ADAPTER")
    nobase = adapter_dir(tmp_path, "nobase", base_model_name_or_path=None)
    code, out, err = run_cli(capsys, "serve", str(nobase), "--dry-run", "--engine", "embedded")
    assert code == 2 and "would serve" not in out
    assert_one_line(err, f"adapter {nobase} does not name its base model", f"--adapter nobase={nobase}")

