"""finetune --from JOB: an imported OpenAI job's data and spec re-run on another backend through the normal plan."""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("openai")

from tests.conftest_openai import RECORDINGS, options  # noqa: E402
from tests.fake_backend import register  # noqa: E402
from tests.replay.fixtures import replay_server  # noqa: E402,F401
from tunekit import _exceptions as errors  # noqa: E402


@pytest.fixture
def imported(replay_server):
    """Jobs A (data kept), B (DPO), C (files deleted) from the recorded --all import."""
    import tunekit

    register()
    srv = replay_server(RECORDINGS / "import_all.json")
    opts = options(srv)
    jobs = tunekit.import_openai(all_jobs=True, api_key=opts.pop("api_key"), base_url=opts.pop("base_url"),
                                 backend_options=opts)
    srv.assert_done()
    return jobs


def test_plan_from_shows_what_carries_over(imported, capsys):
    from tunekit.cli.main import main

    a = imported[0]
    assert main(["plan", "--from", a.id, "--backend", "together", "--base-model", "llama-3.1-8b-instruct",
                 "--json"]) == 0
    fields = {d["field"]: d for d in json.loads(capsys.readouterr().out)["fields"]}
    assert fields["base_model"]["sent"] == "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
    assert fields["hyperparameters.epochs"]["disposition"] == "mapped" and fields["hyperparameters.epochs"]["sent"] == 3
    assert fields["hyperparameters.batch_size"]["value"] == 1
    lr = fields["provider_options.openai.learning_rate_multiplier"]
    assert lr["disposition"] == "unsupported" and "openai" in lr["reason"]
    assert fields["validation_data"]["value"] == a.record.data["validation"]["path"]


def test_finetune_from_runs_the_same_data_elsewhere(imported):
    import tunekit

    a = imported[0]
    with pytest.raises(errors.UnsupportedFieldError, match="learning_rate_multiplier"):
        tunekit.finetune_from(a.id, backend="fake", base_model="tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = tunekit.finetune_from(a.id, backend="fake", base_model="tiny", on_unsupported="warn",
                                    spec={"hyperparameters": {"epochs": 1}})
    assert job.backend_name == "fake" and job.id != a.id
    assert job.record.data["train"]["sha256"] == a.record.data["train"]["sha256"]
    assert job.record.data["validation"]["sha256"] == a.record.data["validation"]["sha256"]
    assert job.record.spec["hyperparameters"] == {"epochs": 1, "batch_size": 1, "seed": 11}  # override merged
    assert job.record.spec["base_model"] == "tiny" and job.record.request["model"] == "tiny"


def test_finetune_from_refuses_missing_or_changed_data(imported):
    import tunekit

    c = imported[2]
    with pytest.raises(errors.ConfigError, match="deleted at the provider") as info:
        tunekit.finetune_from(c.id, backend="fake", base_model="tiny")
    assert "tunekit distill" in info.value.hint
    a = imported[0]
    with open(a.record.data["train"]["path"], "a") as f:
        f.write('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(errors.ConfigError, match="changed since it was recorded"):
        tunekit.finetune_from(a.id, backend="fake", base_model="tiny")


def test_cli_finetune_from_prints_the_plan(imported, capsys):
    from tunekit.cli.main import main

    b = imported[1]
    assert main(["finetune", "--from", b.id, "--backend", "fake", "--base-model", "tiny",
                 "--on-unsupported", "ignore"]) == 0
    out, err = capsys.readouterr()
    assert f"plan for {b.id} on fake" in err
    assert "provider_options.openai.learning_rate_multiplier" in err and "unsupported" in err
    assert "hyperparameters.dpo_beta" in err
    job = tunekit_job(out.strip())
    assert job.record.spec["method"] == "dpo" and job.record.data["train"]["kind"] == "preference"
    assert main(["finetune", "--backend", "fake"]) == 2  # neither DATA nor --from
    assert "one of them" in capsys.readouterr().err


def tunekit_job(job_id):
    import tunekit

    return tunekit.get_job(job_id)
