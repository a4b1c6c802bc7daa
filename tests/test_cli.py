"""The CLI: exit codes, PATH:LINE output, tables/JSON, one-line errors, no torch on start-up."""

import json
import os
import subprocess
import sys

import pytest

import tunekit
from tunekit.cli.main import main
from tests.conftest import EXAMPLES
from tests.fake_backend import register

register()
TRAIN = EXAMPLES / "data" / "train.jsonl"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_exit_codes_and_lines(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "validate", str(TRAIN))
    assert code == 0 and "valid" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    code, out, err = run_cli(capsys, "validate", str(bad))
    assert code == 1
    assert f"{bad}:2:" in out
    code, out, _ = run_cli(capsys, "validate", str(bad), "--json")
    assert code == 1 and json.loads(out)["problems"][0]["line"] == 2


def test_validate_usage_errors_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "error:" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "validate", str(TRAIN), "--backend", "nope")
    assert code == 2 and "unknown backend" in err
    with pytest.raises(SystemExit) as exc:
        main(["validate"])
    assert exc.value.code == 2


def test_plan_table(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": "m", "hyperparameters": {"learning_rate": 3e-4},
                                "adapter": {"use_dora": True}}))
    code, out, _ = run_cli(capsys, "plan", str(spec), "--backend", "fake")
    assert code == 0
    assert "transformed" in out and "unsupported" in out and "fake has no DoRA" in out
    code, _, err = run_cli(capsys, "plan", str(spec), "--backend", "fake", "--on-unsupported", "raise")
    assert code == 2 and "use_dora" in err and "hint:" in err


def test_jobs_commands(capsys):
    job = tunekit.finetune(TRAIN, base_model="m", backend="fake")
    code, out, _ = run_cli(capsys, "jobs", "list", "--json")
    assert code == 0 and json.loads(out)[0]["id"] == job.id
    code, out, _ = run_cli(capsys, "jobs", "wait", job.id, "--interval", "0.01", "--no-progress")
    assert code == 0 and "succeeded" in out
    code, out, _ = run_cli(capsys, "jobs", "status", job.id, "--json")
    assert json.loads(out)["status"] == "succeeded"
    code, out, _ = run_cli(capsys, "jobs", "events", job.id)
    assert "remote at done" in out
    code, _, err = run_cli(capsys, "jobs", "status", "tk-doesnotexist")
    assert code == 2 and "tunekit jobs list" in err


def test_jobs_wait_exit_codes(capsys):
    failing = tunekit.finetune(TRAIN, base_model="m", backend="fake", backend_options={"script": ["pending", "error"]})
    code, _, _ = run_cli(capsys, "jobs", "wait", failing.id, "--interval", "0.01", "--no-progress")
    assert code == 1
    slow = tunekit.finetune(TRAIN, base_model="m", backend="fake",
                            backend_options={"script": ["pending"] + ["training"] * 1000})
    code, _, _ = run_cli(capsys, "jobs", "wait", slow.id, "--timeout", "0.1", "--interval", "0.02", "--no-progress")
    assert code == 124


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "list"], ["backends"], ["export", "--help"]])
def test_cli_start_does_not_import_heavy_modules(argv):
    code = ("import sys, runpy; sys.argv = ['tunekit'] + %r\n"
            "try:\n    runpy.run_module('tunekit.cli.main', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'openai', 'together', 'fireworks', 'peft') if m in sys.modules]\n"
            "print('HEAVY', heavy)" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_unexpected_error_without_traceback_unless_debug(capsys, monkeypatch):
    monkeypatch.setattr("tunekit.api.list_jobs", lambda **kw: 1 / 0)
    code, _, err = run_cli(capsys, "jobs", "list")
    assert code == 1 and "ZeroDivisionError" in err and "Traceback" not in err
    monkeypatch.setenv("TUNEKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["jobs", "list"])


def test_public_api_is_lazy_and_complete():
    code = ("import sys, tunekit\nassert 'pydantic' not in sys.modules, 'import tunekit pulled pydantic'\n"
            "missing = [n for n in tunekit.__all__ if not hasattr(tunekit, n)]\nassert not missing, missing\n"
            "assert tunekit.__all__ == sorted(tunekit.__all__)\nprint('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "OK", out.stderr
