"""vLLM engine: plan building, servability checks, launcher, and the runtime client against recorded exchanges.

vLLM is not installable here. The recordings (tests/recordings/vllm/*.json) were written from vLLM's
source (see their "source" field); a local HTTP server replays them in order and asserts that the
client sends exactly the recorded requests.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tunekit import (
    APIConnectionError,
    BadRequestError,
    ConfigError,
    MissingDependencyError,
    NotFoundError,
    ServerError,
)
from tunekit.serve.vllm import VllmClient, launch, plan_vllm, smallest_vllm_rank

RECORDINGS = Path(__file__).parent / "recordings" / "vllm"
BASE = "meta-llama/Llama-3.1-8B-Instruct"


def adapter_dir(root: Path, name: str, **config) -> Path:
    """A PEFT adapter directory as PEFT writes it (config + weights file)."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "base_model_name_or_path": BASE,
           "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False, "use_rslora": False,
           "modules_to_save": None, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    # a valid safetensors file (one finite float32), written by hand: no torch needed here
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    return d


# -- plan -----------------------------------------------------------------------------------------------

def test_plan_builds_the_exact_command(tmp_path):
    a = adapter_dir(tmp_path, "sql", r=8)
    b = adapter_dir(tmp_path, "poem", r=16)
    plan = plan_vllm(BASE, {"sql": a, "poem": str(b)}, port=8123)
    assert plan.argv == ["vllm", "serve", BASE, "--host", "127.0.0.1", "--port", "8123", "--enable-lora",
                         "--max-loras", "2", "--max-lora-rank", "16", "--lora-modules",
                         f"sql={a.resolve()}", f"poem={b.resolve()}"]
    assert plan.env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert plan.settings == {"max_loras": 2, "max_lora_rank": 16, "host": "127.0.0.1", "port": 8123}
    assert "sql: r=8" in plan.reasons["max_lora_rank"] and "poem: r=16" in plan.reasons["max_lora_rank"]
    assert plan.url == "http://127.0.0.1:8123" and plan.warnings == []
    assert plan.command_line().startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve ")


def vllm_lora_modules(items: list[str]) -> list[tuple[str, str]]:
    """What vLLM's ``LoRAParserAction`` (vllm/entrypoints/openai/cli_args.py) makes of --lora-modules items.

    vLLM cannot be installed here (it replaces the CPU torch), so this is its rule, step for step:
    ``name=path`` only for an item with "=" and no ",", split on EVERY "=" (a second one is an error);
    anything else is JSON for ``LoRAModulePath(name, path, base_model_name=None)``.
    """
    out = []
    for item in items:
        if item in (None, ""):
            continue
        if "=" in item and "," not in item:
            name, path = item.split("=")  # ValueError on a second "=", as in vLLM
            out.append((name, path))
        else:
            d = json.loads(item)  # vLLM: parser.error("Invalid JSON format for --lora-modules")
            assert set(d) <= {"name", "path", "base_model_name"} and {"name", "path"} <= set(d)
            out.append((d["name"], d["path"]))
    return out


def test_lora_modules_survive_vllms_parser_whatever_the_path(tmp_path):
    import shlex

    dirs = {"plain": adapter_dir(tmp_path, "plain"), "comma": adapter_dir(tmp_path, "run,lr=1e-4"),
            "eq": adapter_dir(tmp_path, "lr=1e-4"), "space": adapter_dir(tmp_path, "my run {1}")}
    plan = plan_vllm(BASE, dirs, extra_args=["--max-model-len", "4096"])
    start = plan.argv.index("--lora-modules") + 1
    items = plan.argv[start:plan.argv.index("--max-model-len")]
    assert vllm_lora_modules(items) == [(n, str(p.resolve())) for n, p in dirs.items()]
    assert items[0] == f"plain={dirs['plain'].resolve()}"  # the short form where vLLM reads it right
    assert shlex.split(plan.command_line())[1:] == plan.argv  # the shell line carries the JSON items intact


def _vllm_serve_parser():
    """vLLM's own ``vllm serve`` argument parser, where vLLM's Python code is importable (skipped elsewhere).

    vLLM pins its own torch, so it is not in the test environment. The parser is vLLM's code, not a copy: put the
    wheel's Python files and the small packages they import on PYTHONPATH (docs/serving.md says how) to run this.
    """
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    cli_args = pytest.importorskip("vllm.entrypoints.common.cli_args", reason="vLLM is not importable here")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return cli_args.make_arg_parser(FlexibleArgumentParser())


def test_every_planned_command_parses_with_vllms_own_parser(tmp_path):
    parser = _vllm_serve_parser()
    dirs = {"plain": adapter_dir(tmp_path, "plain", r=8), "comma": adapter_dir(tmp_path, "run,lr=1e-4", r=64),
            "eq": adapter_dir(tmp_path, "lr=1e-4"), "space": adapter_dir(tmp_path, "my run {1}"),
            "quote": adapter_dir(tmp_path, 'say "hi",\\x')}
    plans = [plan_vllm(BASE, dirs, port=8123, extra_args=["--max-model-len", "4096"]),
             plan_vllm(BASE, {"comma": dirs["comma"]}, max_loras=3, host="0.0.0.0", api_key="k"),
             plan_vllm(BASE, {})]
    for plan in plans:
        assert plan.argv[:2] == ["vllm", "serve"]
        args = parser.parse_args(plan.argv[2:])  # argparse exits (SystemExit) on anything vLLM refuses
        assert args.model_tag == BASE and args.port == plan.settings["port"] and args.host == plan.settings["host"]
        assert args.max_loras == plan.settings["max_loras"] and args.max_lora_rank == plan.settings["max_lora_rank"]
        got = [(m.name, m.path) for m in args.lora_modules or []]
        assert got == [(n, str(p)) for n, p in plan.adapters.items()], plan.argv
    # the form vLLM refuses (what the plan emitted for comma paths before): the parser really checks
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--lora-modules", f"comma={dirs['comma'].resolve()}"])


@pytest.mark.parametrize("rank,expected", [(1, 1), (4, 8), (8, 8), (9, 16), (17, 32), (256, 256), (300, 320),
                                           (512, 512)])
def test_smallest_allowed_rank(rank, expected):
    assert smallest_vllm_rank(rank) == expected


def test_rank_pattern_counts_and_rank_above_512_is_refused(tmp_path):
    a = adapter_dir(tmp_path, "a", r=8, rank_pattern={"down_proj": 48})
    assert plan_vllm(BASE, {"a": a}).settings["max_lora_rank"] == 64
    big = adapter_dir(tmp_path, "big", r=1024)
    with pytest.raises(ConfigError, match="above vLLM's maximum 512") as err:
        plan_vllm(BASE, {"big": big})
    assert "tunekit merge" in err.value.hint


def test_no_adapters_uses_vllm_default_rank_and_one_slot():
    plan = plan_vllm(BASE, {})
    assert plan.settings["max_lora_rank"] == 16 and plan.settings["max_loras"] == 1
    assert "--lora-modules" not in plan.argv and "runtime loads above it fail" in plan.reasons["max_lora_rank"]


@pytest.mark.parametrize("config,match,field", [
    ({"use_dora": True}, "DoRA", "adapter.use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "adapter.modules_to_save"),
    ({"init_lora_weights": "pissa"}, "'pissa'", "adapter.init_lora_weights"),
    ({"init_lora_weights": "pissa_niter_16"}, "'pissa_niter_16'", "adapter.init_lora_weights"),
    ({"init_lora_weights": "olora"}, "'olora'", "adapter.init_lora_weights"),
    ({"bias": "lora_only"}, "biases", "adapter.bias"),
])
def test_unservable_adapters_are_refused_with_next_step(tmp_path, config, match, field):
    a = adapter_dir(tmp_path, "a", **config)
    with pytest.raises(ConfigError, match=match) as err:
        plan_vllm(BASE, {"a": a})
    assert err.value.field == field and err.value.hint
    hint = err.value.hint
    assert ("path_initial_model_for_weight_conversion" in hint) if "init" in field else ("tunekit merge" in hint)
    if "dora" in field:  # and the engine that does serve it
        assert "--engine embedded" in hint


def test_converted_pissa_adapter_is_servable(tmp_path):
    # PEFT's conversion saves init_lora_weights=True and doubles r (and alpha)
    a = adapter_dir(tmp_path, "a", r=32, lora_alpha=64, init_lora_weights=True)
    assert plan_vllm(BASE, {"a": a}).settings["max_lora_rank"] == 32


def test_base_model_mismatch_refused_unless_allowed(tmp_path):
    a = adapter_dir(tmp_path, "a", base_model_name_or_path="Qwen/Qwen2.5-7B")
    with pytest.raises(ConfigError, match="trained on 'Qwen/Qwen2.5-7B'") as err:
        plan_vllm(BASE, {"a": a})
    assert err.value.field == "base_model"
    plan = plan_vllm(BASE, {"a": a}, allow_base_mismatch=True)
    assert "allowed by allow_base_mismatch" in plan.warnings[0]
    nobase = adapter_dir(tmp_path, "nobase", base_model_name_or_path=None)
    assert "does not name its base model" in plan_vllm(BASE, {"n": nobase}).warnings[0]


def test_local_base_paths_compare_resolved(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    a = adapter_dir(tmp_path, "a", base_model_name_or_path=str(base) + "/")
    assert plan_vllm(str(tmp_path / "." / "base"), {"a": a}).warnings == []


def test_given_settings_are_checked(tmp_path):
    a = adapter_dir(tmp_path, "a", r=32)
    with pytest.raises(ConfigError, match="below the largest adapter rank 32"):
        plan_vllm(BASE, {"a": a}, max_lora_rank=16)
    with pytest.raises(ConfigError, match="not one vLLM accepts"):
        plan_vllm(BASE, {"a": a}, max_lora_rank=48)
    plan = plan_vllm(BASE, {"a": a}, max_lora_rank=64, max_loras=8)
    assert plan.settings["max_lora_rank"] == 64 and plan.settings["max_loras"] == 8
    assert plan.reasons["max_loras"] == "given"


def test_extra_args_append_but_cannot_override_owned_flags(tmp_path):
    plan = plan_vllm(BASE, {}, extra_args=["--gpu-memory-utilization", "0.85", "--max-model-len=8192"])
    assert plan.argv[-3:] == ["--gpu-memory-utilization", "0.85", "--max-model-len=8192"]
    with pytest.raises(ConfigError, match="--max-lora-rank"):
        plan_vllm(BASE, {}, extra_args=["--max-lora-rank=64"])


def test_api_key_goes_to_the_environment_not_argv():
    plan = plan_vllm(BASE, {}, api_key="sk-secret")
    assert "sk-secret" not in " ".join(plan.argv)
    assert plan.env["VLLM_API_KEY"] == "sk-secret"
    assert "sk-secret" not in plan.command_line() and "sk-secret" not in json.dumps(plan.to_dict())
    assert "sk-secret" not in repr(plan)


def test_bad_adapter_names_and_non_adapters(tmp_path):
    a = adapter_dir(tmp_path, "a")
    with pytest.raises(ConfigError, match="cannot be served"):
        plan_vllm(BASE, {"my=adapter": a})
    with pytest.raises(ConfigError, match="neither an adapter directory nor an adapter in the registry"):
        plan_vllm(BASE, {"x": tmp_path / "nowhere"})
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        plan_vllm(BASE, {"x": tmp_path})


def test_registry_adapters_resolve_to_their_location(tmp_path):
    from tunekit.store import default_store

    a = adapter_dir(tmp_path, "reg", r=64)
    rec = default_store().add_adapter(backend="local", location=str(a), info={}, name="support-bot",
                                      base_model=BASE)
    plan = plan_vllm(BASE, {"bot": "support-bot"})
    assert f"bot={a.resolve()}" in plan.argv and plan.settings["max_lora_rank"] == 64
    assert plan_vllm(BASE, {"bot": rec.id}).adapters == {"bot": str(a.resolve())}


# -- runtime client against recorded exchanges ------------------------------------------------------

class Replay:
    """Serves recorded exchanges in order; fails the test if the client sends anything else."""

    def __init__(self, name: str) -> None:
        self.exchanges = json.loads((RECORDINGS / name).read_text())["exchanges"]
        self.position = 0
        self.mismatch: str | None = None
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                want = replay.exchanges[replay.position]["request"] if replay.position < len(replay.exchanges) \
                    else None
                got = {"method": self.command, "path": self.path, **({"json": body} if body is not None else {})}
                if got != want:
                    replay.mismatch = f"expected {want}, got {got}"
                    self.send_response(599)
                    self.end_headers()
                    return
                resp = replay.exchanges[replay.position]["response"]
                replay.position += 1
                payload = json.dumps(resp["json"]).encode() if "json" in resp else resp["text"].encode()
                self.send_response(resp["status"])
                if "json" in resp:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        assert self.mismatch is None, self.mismatch
        assert self.position == len(self.exchanges), "not every recorded exchange was used"


def test_runtime_load_unload_against_recorded_vllm():
    replay = Replay("runtime_lora.json")
    with VllmClient(replay.url) as client:
        assert client.health()
        assert client.load_adapter("sql", "/adapters/sql") == "Success: LoRA adapter 'sql' added successfully."
        with pytest.raises(BadRequestError, match="has already been loaded") as err:
            client.load_adapter("sql", "/adapters/sql")
        assert err.value.status_code == 400 and err.value.provider == "vllm" and "unload it first" in err.value.hint
        models = client.models()
        assert [m["id"] for m in models] == [BASE, "sql"] and models[1]["parent"] == BASE
        with pytest.raises(NotFoundError, match="No adapter found") as err:
            client.load_adapter("missing", "/adapters/missing")
        assert "server's machine" in err.value.hint
        assert client.unload_adapter("sql") == "Success: LoRA adapter 'sql' removed successfully."
        with pytest.raises(NotFoundError, match="cannot be found"):
            client.unload_adapter("sql")
    replay.close()


def test_runtime_updating_disabled_gets_the_env_var_hint():
    replay = Replay("runtime_updating_disabled.json")
    with VllmClient(replay.url) as client, pytest.raises(NotFoundError) as err:
        client.load_adapter("sql", "/adapters/sql")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in err.value.hint
    replay.close()


def test_client_checks_a_local_adapter_before_sending(tmp_path):
    replay = Replay("runtime_updating_disabled.json")  # any request would be a mismatch...
    dora = adapter_dir(tmp_path, "dora", use_dora=True)
    with VllmClient(replay.url) as client, pytest.raises(ConfigError, match="DoRA"):
        client.load_adapter("d", dora)
    assert replay.position == 0 and replay.mismatch is None  # ...and none was sent
    replay.httpd.shutdown()


def test_unreachable_server_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with VllmClient(f"http://127.0.0.1:{port}", timeout=2) as client:
        assert client.health() is False
        with pytest.raises(APIConnectionError):
            client.unload_adapter("x")


# -- launcher -------------------------------------------------------------------------------------------

def _fake_vllm(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "fake-vllm"
    exe.write_text(f"#!{sys.executable}\n{body}")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


FAKE_SERVER = """
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
assert args[:2] == ["serve", "base-model"], args
assert os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
port = int(args[args.index("--port") + 1])
print("starting", flush=True)
time.sleep(0.5)  # not healthy at once, like a model loading
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_waits_for_health_and_stops(tmp_path):
    exe = _fake_vllm(tmp_path, FAKE_SERVER)
    plan = plan_vllm("base-model", {}, port=_free_port(), executable=str(exe))
    server = launch(plan, timeout=30, poll_interval=0.1, log_path=tmp_path / "vllm.log")
    try:
        assert server.process.poll() is None and server.client.health()
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert "starting" in (tmp_path / "vllm.log").read_text()


def test_launch_reports_an_early_exit_with_the_log_tail(tmp_path):
    exe = _fake_vllm(tmp_path, "import sys\nprint('CUDA out of memory', flush=True)\nsys.exit(3)\n")
    plan = plan_vllm("base-model", {}, port=_free_port(), executable=str(exe))
    with pytest.raises(ServerError, match="exited with code 3") as err:
        launch(plan, timeout=30, poll_interval=0.1, log_path=tmp_path / "vllm.log")
    assert "CUDA out of memory" in str(err.value) and "vllm.log" in err.value.hint


def test_launch_without_vllm_installed(tmp_path):
    plan = plan_vllm(BASE, {}, executable=str(tmp_path / "no-such-vllm"))
    with pytest.raises(MissingDependencyError) as err:
        launch(plan)
    assert "engine='embedded'" in err.value.hint


def test_engine_choice(monkeypatch):
    import importlib.util

    from tunekit.serve import pick_engine

    assert pick_engine("vllm") == "vllm" and pick_engine("embedded") == "embedded"
    with pytest.raises(ConfigError):
        pick_engine("tgi")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert pick_engine(None) == "embedded"


def test_importing_serve_is_light():
    import subprocess

    code = ("import sys, tunekit.serve, tunekit.serve.vllm, tunekit.serve.embedded, tunekit.serve.adapters; "
            "bad = [m for m in ('torch', 'transformers', 'fastapi', 'httpx', 'peft') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stdout + out.stderr


# -- CLI (tunekit/cli/serve.py; registered by the CLI's main) ---------------------------------------------

def _cli(argv: list[str]) -> int:
    import argparse

    from tunekit.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    return args.func(args)


def test_cli_vllm_dry_run_prints_the_checked_plan(tmp_path, capsys, monkeypatch):
    a = adapter_dir(tmp_path, "sql", r=24)
    monkeypatch.setenv("TUNEKIT_SERVE_API_KEY", "from-env")
    assert _cli([BASE, "--adapter", f"sql={a}", "--engine", "vllm", "--dry-run", "--json",
                 "--vllm-arg=--max-model-len=4096"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["max_lora_rank"] == 32 and plan["argv"][-1] == "--max-model-len=4096"
    assert plan["env"]["VLLM_API_KEY"] == "***"
    dora = adapter_dir(tmp_path, "dora", use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        _cli([BASE, "--adapter", f"d={dora}", "--engine", "vllm", "--dry-run"])
    with pytest.raises(ConfigError, match="not NAME=PATH"):
        _cli([BASE, "--adapter", str(a), "--engine", "vllm", "--dry-run"])


def test_cli_embedded_dry_run_checks_adapters(tmp_path, capsys):
    a = adapter_dir(tmp_path, "sql", r=8)
    assert _cli([BASE, "--adapter", f"sql={a}", "--engine", "embedded", "--dry-run"]) == 0
    assert "sql: " in capsys.readouterr().out
    bad = adapter_dir(tmp_path, "bad", modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        _cli([BASE, "--adapter", f"b={bad}", "--engine", "embedded", "--dry-run"])


def test_an_unreadable_weights_file_is_refused_before_launch(tmp_path):
    pytest.importorskip("torch")
    bad = adapter_dir(tmp_path, "torn")
    (bad / "adapter_model.safetensors").write_bytes(b"")  # a save cut short
    with pytest.raises(ConfigError, match="cannot read adapter_model.safetensors") as err:
        plan_vllm(BASE, {"torn": str(bad)})
    assert "re-save it" in err.value.hint
