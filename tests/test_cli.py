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


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "list"], ["backends"], ["export", "--help"], ["eval", "--help"],
                                  ["adapters", "list", "--sort", "loss"], ["merge", "--help"], ["serve", "--help"],
                                  ["jobs", "metrics", "--help"]])
def test_cli_start_does_not_import_heavy_modules(argv):
    code = ("import sys, runpy; sys.argv = ['tunekit'] + %r\n"
            "try:\n    runpy.run_module('tunekit.cli.main', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'openai', 'together', 'fireworks', 'peft', 'matplotlib')\n"
            "         if m in sys.modules]\n"
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


# -- every known failure: exit 2, one stderr line with the next step, no traceback -------------------

def assert_one_line(err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; hint: " in lines[0], err
    assert "Traceback" not in err and "Error:" not in err.split(";")[0], err  # no `error: SomeError:` line
    for needle in needles:
        assert needle in err, err


def cli_subprocess(*argv, env=None, prelude="", **kw):
    code = f"import sys\n{prelude}\nfrom tunekit.cli.main import main\nsys.exit(main({list(argv)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, **kw)


def test_unknown_status_filter(capsys):
    code, out, err = run_cli(capsys, "jobs", "list", "--status", "bogus")
    assert code == 2 and out == ""
    assert_one_line(err, "'bogus' is not a job status", "succeeded")


@pytest.mark.parametrize("content,what", [(b"", "is empty (0 bytes)"), (b"not sqlite at all\n" * 8, "not a SQLite")])
def test_truncated_or_foreign_store_is_refused_not_replaced(capsys, tunekit_home, content, what):
    tunekit_home.mkdir()
    db = tunekit_home / "state.db"
    db.write_bytes(content)
    code, _, err = run_cli(capsys, "jobs", "list")
    assert code == 2
    assert_one_line(err, str(db), what, f"mv {db} {db}.broken")
    assert db.read_bytes() == content  # nothing was written over it


def _drop_dac_override():
    """As root, obey file permissions like any user would (drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the next exec's capabilities
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("sub", ["", "not-yet-created"])
def test_read_only_home(tmp_path, sub):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    home = ro / sub if sub else ro
    kw = {"preexec_fn": _drop_dac_override} if os.geteuid() == 0 else {}
    try:
        res = cli_subprocess("jobs", "list", env={"TUNEKIT_HOME": str(home)}, **kw)
    except subprocess.SubprocessError as exc:  # no CAP_SETPCAP to drop the override with
        pytest.skip(f"cannot run without permission override here: {exc}")
    finally:
        ro.chmod(0o700)
    assert res.returncode == 2, res.stderr
    assert_one_line(res.stderr, f"cannot write to {home}", "must be a writable directory", "TUNEKIT_HOME")


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--dry-run", "--engine", "vllm"]])
def test_serve_refuses_a_path_that_does_not_exist(capsys, tmp_path, extra):
    missing = tmp_path / "no-such-model"
    code, out, err = run_cli(capsys, "serve", str(missing), *extra)
    assert code == 2 and "would serve" not in out
    assert_one_line(err, f"{missing} does not exist")
    # a hub id is not a local path: the dry run still plans it
    code, out, _ = run_cli(capsys, "serve", "meta-llama/Llama-3.1-8B-Instruct", "--dry-run")
    assert code == 0 and "would serve" in out


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])  # the dry run says so too, not "would serve"
def test_serve_without_the_serve_extra_gives_the_pip_line(tmp_path, extra):
    # fastapi made unimportable, as in an install without [serve]
    res = cli_subprocess("serve", str(tmp_path), "--engine", "embedded", *extra,
                         prelude="sys.modules['fastapi'] = None")
    assert res.returncode == 2 and "would serve" not in res.stdout, res.stderr
    assert_one_line(res.stderr, "fastapi", "pip install 'tunekit[local,serve]'")


def test_closed_stdout_ends_quietly():
    """`tunekit jobs events JOB | head -1`: no BrokenPipeError, no traceback."""
    from tunekit.schemas.job import JobEvent
    from tunekit.store import default_store

    store = default_store()
    job = store.create_job("local", {"base_model": "m"}, {})  # a backend the subprocess knows
    for i in range(300):  # ~300 KB: more than a pipe buffer, so the writer meets the closed pipe
        store.add_event(job.id, JobEvent(created_at=float(i), message="x" * 1000))
    proc = subprocess.Popen([sys.executable, "-m", "tunekit.cli.main", "jobs", "events", job.id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == "", err


def test_a_multi_line_message_is_still_one_line(capsys, monkeypatch):
    from tunekit import ConfigError

    def fail(**kw):
        raise ConfigError("/data/my  file.jsonl: first\nsecond", hint="do this\nthen that")

    monkeypatch.setattr("tunekit.api.list_jobs", fail)
    code, _, err = run_cli(capsys, "jobs", "list")
    assert code == 2
    assert err == "error: /data/my  file.jsonl: first second; hint: do this then that\n"


@pytest.mark.parametrize("max_length", [None, 64])  # the default 2048 (131,072 bytes a row) and a set one
def test_the_validate_command_in_a_data_refusal_finds_the_same_problem(capsys, tmp_path, max_length):
    import re
    import shlex

    data = tmp_path / "my data" / "train.jsonl"  # a space: the command runs as printed
    data.parent.mkdir()
    row = '{"prompt": "p", "response": "%s"}' % ("x" * 140_000)  # over 2048 x 64 bytes
    data.write_text('{"prompt": "a", "response": "b"}\n' + row + "\n")
    extra = ["--set", f"hyperparameters.max_length={max_length}"] if max_length else []
    code, _, err = run_cli(capsys, "finetune", str(data), "--backend", "local", "--base-model", "m", *extra)
    assert code == 1 and f"line 2: row is {len(row):,} bytes" in err
    command = re.search(r"run `(tunekit validate [^`]+)`", err).group(1)
    code, out, _ = run_cli(capsys, *shlex.split(command)[1:])
    assert code == 1 and f"{data}:2: row is {len(row):,} bytes" in out and "(row_too_long)" in out


@pytest.mark.parametrize("name,content,what", [
    ("list.json", b"[1]\n", "the spec is a list, not an object"),
    ("text.json", b'"x"\n', "the spec is a str, not an object"),
    ("list.yaml", b"- a\n", "the spec is a list, not an object"),
    ("utf16.json", b"\xff\xfe{\x00}\x00", "not a valid spec file"),
    ("missing.json", None, "spec file not found"),
])
def test_a_spec_file_that_is_not_an_object_is_one_line(capsys, tmp_path, name, content, what):
    spec = tmp_path / name
    if content is not None:
        spec.write_bytes(content)
    code, out, err = run_cli(capsys, "plan", str(spec), "--backend", "local")
    assert code == 2 and out == ""
    assert_one_line(err, what, "docs/spec.md")


@pytest.mark.parametrize("argv", [["validate", "x.jsonl", "--max-problems", "-1"],
                                  ["validate", "x.jsonl", "--max-problems", "0"],
                                  ["plan", "spec.json", "--backend", "local", "--rows", "-5"]])
def test_counts_below_one_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: exit 2 naming the option, before any file is read
        main(argv)
    assert exc.value.code == 2
    assert argv[-2] in capsys.readouterr().err
