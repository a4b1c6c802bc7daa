"""examples/quickstart.py runs unchanged on every managed backend; only --backend (and the model) differ.

Each provider is its replay server (recorded exchanges checked against the provider's spec elsewhere).
Fireworks' run lives in tests/test_fireworks_lifecycle.py; local in tests/test_local_job.py's demo test.
"""

import datetime as dt
import runpy
import sys

import pytest

from tests.replay.fixtures import replay_server  # noqa: F401  (fixture)

from tests.conftest import EXAMPLES

REC = EXAMPLES.parent / "tests" / "recordings"

CASES = {
    "openai": ("OPENAI_BASE_URL", "OPENAI_API_KEY", "{url}/v1", "gpt-4o-mini", "succeeded ft:gpt-4o-mini"),
    "together": ("TOGETHER_BASE_URL", "TOGETHER_API_KEY", "{url}/v1", "llama-3.1-8b-instruct", "succeeded "),
}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_quickstart_runs_on_managed_backend(backend, replay_server, monkeypatch, capsys):
    if backend == "openai" and dt.datetime.now(dt.timezone.utc).date() >= dt.date(2027, 1, 6):
        pytest.skip("OpenAI stopped new fine-tuning jobs on 2027-01-06; tunekit refuses them by design")
    url_var, key_var, url, model, expected = CASES[backend]
    srv = replay_server(REC / backend / "lifecycle.json")
    monkeypatch.setenv(url_var, url.format(url=srv.url))
    monkeypatch.setenv(key_var, "test-key")
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--backend", backend, "--base-model", model])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OpenAI's shutdown notice
        runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    srv.assert_done()
    out = capsys.readouterr().out
    assert expected in out, out


@pytest.mark.slow
def test_quickstart_runs_on_the_local_backend(tiny_model, monkeypatch, capsys, tmp_path):
    """The same script, --backend local: a real (tiny) fine-tune in a detached worker."""
    data = tmp_path / "train.jsonl"  # a slice of the example data keeps the CPU run short
    data.write_text("".join((EXAMPLES / "data" / "train.jsonl").read_text().splitlines(True)[:24]))
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--backend", "local", "--base-model", str(tiny_model),
                                      "--data", str(data), "--timeout", "300"])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "succeeded" in out and "/adapter" in out, out
