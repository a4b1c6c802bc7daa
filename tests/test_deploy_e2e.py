"""Train locally -> merge (checked) -> serve the job's adapter -> query with the stock openai client.

The path a user takes from the README, end to end on a tiny model.
"""

import json

import pytest

import tunekit
from tunekit.cli.main import main
from tunekit.schemas.job import JobStatus
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    # A module-scoped home: the job, its adapter and registry entry are shared by the tests below.
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEKIT_HOME", str(home))
    job = tunekit.finetune(EXAMPLES / "data" / "train.jsonl", base_model=str(tiny_model), backend="local",
                           adapter={"r": 8}, hyperparameters={"batch_size": 8, "max_length": 96, "epochs": 1},
                           provider_options={"local": {"max_steps": 3}})
    job.wait(timeout=300, progress=False)
    assert job.status == JobStatus.SUCCEEDED, job.error
    yield job, home
    mp.undo()


def test_merge_from_the_cli_records_the_check(trained, tmp_path, monkeypatch, capsys):
    job, home = trained
    monkeypatch.setenv("TUNEKIT_HOME", str(home))
    out = tmp_path / "merged"
    code = main(["merge", job.id, "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == (1 if result["flagged"] else 0)
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    assert 0.0 <= result["top1_agreement"] <= 1.0 and result["positions"] > 0
    entry = tunekit.get_job(job.id).result.registry_id
    from tunekit.store import default_store

    check = default_store().get_adapter(entry).merge_check
    assert check["top1_agreement"] == result["top1_agreement"]
    # The check prompts came from the job's own training data.
    first_prompt = json.loads((EXAMPLES / "data" / "train.jsonl").read_text().splitlines()[0])["prompt"]
    assert any(first_prompt in p for p in result["prompts"])


def test_job_serve_answers_the_openai_client(trained, monkeypatch):
    openai = pytest.importorskip("openai")
    job, home = trained
    monkeypatch.setenv("TUNEKIT_HOME", str(home))
    job = tunekit.get_job(job.id)
    with job.serve(engine="embedded", block=False, port=0, name="mine") as handle:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="unused")
        models = {m.id for m in client.models.list().data}
        assert "mine" in models
        reply = client.completions.create(model="mine", prompt="What is 2 + 2?", max_tokens=4, temperature=0)
        assert reply.model == "mine" and reply.usage.completion_tokens >= 1


def test_serve_plan_for_a_job_names_its_base(trained, monkeypatch, capsys):
    job, home = trained
    monkeypatch.setenv("TUNEKIT_HOME", str(home))
    code = main(["serve", job.id, "--engine", "embedded", "--plan", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["base_model"] == job.spec.base_model
    assert list(plan["adapters"]) == [job.id]


def test_managed_job_cannot_be_merged_locally(tmp_path):
    from tests.fake_backend import register

    register()
    job = tunekit.finetune(EXAMPLES / "data" / "train.jsonl", base_model="m", backend="fake")
    job.wait(timeout=10, progress=False)
    with pytest.raises(tunekit.JobStateError, match="lives at the provider"):
        job.merge(str(tmp_path / "x"))
