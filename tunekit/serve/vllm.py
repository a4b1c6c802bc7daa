"""Serve adapters with vLLM: a checked launch plan, the launcher, and a runtime load/unload client.

``plan_vllm`` refuses, before anything starts, what vLLM would refuse later or serve wrongly:
DoRA, ``modules_to_save``, bias training, unconverted PiSSA/OLoRA/CorDA adapters, ranks above 512,
and adapters trained on another base. It picks ``--max-lora-rank`` as the smallest rank vLLM
accepts that covers every adapter (vLLM's default of 16 silently refuses larger ranks at load).
Runtime load/unload needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; the plan sets it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import (
    APIConnectionError,
    ConfigError,
    MissingDependencyError,
    ServerError,
    api_error_for_status,
)
from ..adapters.info import read_adapter
from ..adapters.resolve import resolve_adapter
from .adapters import refuse_non_finite, refuse_unservable, same_base

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
_OWNED_FLAGS = ("--enable-lora", "--max-loras", "--max-lora-rank", "--lora-modules", "--port", "--host", "--api-key")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


@dataclass(frozen=True)
class VllmPlan:
    """The exact command, environment and settings of a vLLM launch, with the reason for each setting."""

    argv: list[str]
    env: dict[str, str] = field(repr=False)
    url: str
    base_model: str
    adapters: dict[str, str]
    settings: dict[str, Any]
    reasons: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        """The shell line to run by hand (the API key, if any, is shown masked)."""
        env = " ".join(f"{k}={'***' if 'KEY' in k else shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}".strip()

    def to_dict(self) -> dict[str, Any]:
        return {"argv": self.argv, "env": {k: ("***" if "KEY" in k else v) for k, v in self.env.items()},
                "url": self.url, "base_model": self.base_model, "adapters": self.adapters,
                "settings": self.settings, "reasons": self.reasons, "warnings": self.warnings,
                "command_line": self.command_line()}


def smallest_vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that covers ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}", field="adapter.r",
                      hint="merge the adapter (`tunekit merge ADAPTER OUT_DIR`) and serve the merged model, "
                           f"or retrain with r <= {VLLM_LORA_RANKS[-1]}")


def lora_module_arg(name: str, path: str) -> str:
    """One ``--lora-modules`` item as vLLM's parser (``LoRAParserAction``) reads it back as (name, path).

    It takes ``name=path`` only when the item has no comma, and then splits on every ``=``; any other
    item is parsed as JSON. So a path with a comma or an ``=`` (both legal in file names) goes as JSON.
    """
    item = f"{name}={path}"
    if item.count("=") == 1 and "," not in item:
        return item
    return json.dumps({"name": name, "path": path})


def plan_vllm(base_model: str, adapters: dict[str, str | os.PathLike[str]] | None = None, *,
              max_loras: int | None = None, max_lora_rank: int | None = None, port: int = 8000,
              host: str = "127.0.0.1", api_key: str | None = None, extra_args: tuple[str, ...] | list[str] = (),
              allow_base_mismatch: bool = False, executable: str = "vllm") -> VllmPlan:
    """Check every adapter for vLLM and build the launch command. Raises ConfigError with the next step."""
    adapters = dict(adapters or {})
    resolved: dict[str, str] = {}
    warnings: list[str] = []
    ranks: dict[str, int] = {}
    for name, ref in adapters.items():
        if not _NAME.match(name) or name == base_model:
            raise ConfigError(f"adapter name {name!r} cannot be served by vLLM (letters, digits and ._:/@+- only; "
                              "not the base model's name)", field="adapters", hint="rename it")
        path, _record = resolve_adapter(ref)
        info = read_adapter(path)
        refuse_unservable(info, engine="vLLM", name=name)
        refuse_non_finite(info, name=name)
        smallest_vllm_rank(info.max_rank)  # refuses rank > 512
        ranks[name] = info.max_rank
        if not info.base_model:
            warnings.append(f"adapter {name!r} does not name its base model; make sure it was trained on {base_model}")
        elif not same_base(info.base_model, base_model):
            msg = f"adapter {name!r} was trained on {info.base_model!r}, not on the served base {base_model!r}"
            if not allow_base_mismatch:
                raise ConfigError(msg, field="base_model",
                                  hint="serve it on its own base, or pass allow_base_mismatch=True "
                                       "(CLI: --allow-base-mismatch) if both names refer to the same weights")
            warnings.append(msg + " (allowed by allow_base_mismatch)")
        resolved[name] = str(path.resolve())

    reasons: dict[str, str] = {}
    needed = max(ranks.values(), default=0)
    if max_lora_rank is None:
        rank = smallest_vllm_rank(needed) if ranks else VLLM_DEFAULT_MAX_LORA_RANK
        reasons["max_lora_rank"] = (
            f"smallest vLLM rank covering the largest adapter rank {needed} "
            f"({', '.join(f'{n}: r={r}' for n, r in ranks.items())})" if ranks else
            f"no adapters at start: vLLM's default {VLLM_DEFAULT_MAX_LORA_RANK}; runtime loads above it fail — "
            "pass max_lora_rank to allow larger ones")
    else:
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"max_lora_rank {max_lora_rank} is not one vLLM accepts {VLLM_LORA_RANKS}",
                              field="max_lora_rank", hint=f"use {smallest_vllm_rank(max(max_lora_rank, 1))}")
        if max_lora_rank < needed:
            raise ConfigError(f"max_lora_rank {max_lora_rank} is below the largest adapter rank {needed}",
                              field="max_lora_rank", hint=f"use max_lora_rank={smallest_vllm_rank(needed)}")
        rank = max_lora_rank
        reasons["max_lora_rank"] = "given"
    if max_loras is None:
        loras = max(1, len(resolved))
        reasons["max_loras"] = (f"one GPU slot per adapter given ({len(resolved)}): requests for all of them can "
                                "share a batch" if resolved else "vLLM's default (1 adapter per batch)")
    else:
        if max_loras < 1:
            raise ConfigError("max_loras must be at least 1", field="max_loras")
        loras = max_loras
        reasons["max_loras"] = "given"
    extra = [str(a) for a in extra_args]
    clash = sorted({a.split("=", 1)[0] for a in extra} & set(_OWNED_FLAGS))
    if clash:
        raise ConfigError(f"extra_args sets {', '.join(clash)}, which the plan sets itself", field="extra_args",
                          hint="use plan_vllm's parameters (max_loras, max_lora_rank, port, host, api_key) instead")

    argv = [executable, "serve", str(base_model), "--host", host, "--port", str(port), "--enable-lora",
            "--max-loras", str(loras), "--max-lora-rank", str(rank)]
    if resolved:
        argv += ["--lora-modules", *(lora_module_arg(n, p) for n, p in resolved.items())]
    argv += extra
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    reasons["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "enables /v1/load_lora_adapter and /v1/unload_lora_adapter"
    if api_key:
        env["VLLM_API_KEY"] = api_key  # the environment, not argv: argv is visible to every local user
        reasons["VLLM_API_KEY"] = "bearer token required on every /v1 request"
    shown = f"[{host}]" if ":" in host else host
    return VllmPlan(argv=argv, env=env, url=f"http://{shown}:{port}", base_model=str(base_model), adapters=resolved,
                    settings={"max_loras": loras, "max_lora_rank": rank, "host": host, "port": port},
                    reasons=reasons, warnings=warnings)


# -- launcher ---------------------------------------------------------------------------------------

class VllmServer:
    """A running ``vllm serve`` process."""

    def __init__(self, process: subprocess.Popen, plan: VllmPlan, log_path: Path) -> None:
        self.process = process
        self.plan = plan
        self.url = plan.url
        self.log_path = log_path

    @property
    def client(self) -> "VllmClient":
        return VllmClient(self.url, api_key=self.plan.env.get("VLLM_API_KEY"))

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _log_tail(path: Path, secret: str | None, lines: int = 20) -> str:
    """The log's last lines, with ``secret`` (the API key) masked: they go into an error message."""
    try:
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
    return tail.replace(secret, "***") if secret else tail


def launch(plan: VllmPlan, *, timeout: float = 900.0, log_path: str | os.PathLike[str] | None = None,
           poll_interval: float = 1.0) -> VllmServer:
    """Start ``plan.argv`` and return once ``GET /health`` answers 200 (the process is stopped on failure)."""
    import httpx

    if shutil.which(plan.argv[0]) is None:
        raise MissingDependencyError(
            f"{plan.argv[0]!r} is not on PATH: vLLM is not installed here",
            hint="install vLLM on the GPU machine (`pip install vllm`; it pins its own torch, so use a separate "
                 "environment), or serve with engine='embedded'")
    if log_path is None:
        from .._settings import tunekit_home

        log_dir = tunekit_home() / "serve"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"vllm-{plan.settings['port']}-{int(time.time())}.log"
    log_path = Path(log_path)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(plan.argv, env={**os.environ, **plan.env}, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = VllmServer(process, plan, log_path)
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise ServerError(f"vLLM exited with code {code} before it was ready. Last log lines:\n"
                              f"{_log_tail(log_path, plan.env.get('VLLM_API_KEY'))}", provider="vllm",
                              hint=f"read {log_path}; common causes: GPU memory (lower --gpu-memory-utilization "
                                   "or --max-model-len via extra_args), an unservable adapter, a busy port")
        try:
            if httpx.get(plan.url + "/health", timeout=5.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise APIConnectionError(f"vLLM did not become healthy within {timeout:.0f}s", provider="vllm",
                                     hint=f"read {log_path}; large models need a longer timeout")
        time.sleep(poll_interval)


# -- runtime client ---------------------------------------------------------------------------------

class VllmClient:
    """Adapter load/unload and model listing on a running vLLM server (httpx; ``transport`` is the test seam)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 transport: Any = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "VllmClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def health(self) -> bool:
        import httpx

        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models").json()["data"]

    def load_adapter(self, name: str, path: str | os.PathLike[str], *, check: bool = True) -> str:
        """Load ``path`` as ``name``. With ``check``, a local adapter dir is checked for vLLM first."""
        if check and Path(path).expanduser().is_dir():
            info = read_adapter(path)
            refuse_unservable(info, engine="vLLM", name=name)
            refuse_non_finite(info, name=name)
            smallest_vllm_rank(info.max_rank)
        return self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}).text

    def unload_adapter(self, name: str) -> str:
        return self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}).text

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None):
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"cannot reach vLLM at {self._http.base_url}: {exc}", provider="vllm",
                                     hint="is the server running? (`tunekit serve ... --engine vllm`)") from exc
        if resp.status_code < 400:
            return resp
        raise _error(resp, path)


def _error(resp: Any, path: str) -> Exception:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    message: str = resp.text
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # current vLLM: {"error": {"message", "type", "param", "code"}}
            message = err.get("message") or message
        elif "message" in body:  # older vLLM: {"object": "error", "message", "type", "code"}
            message = body["message"]
        elif "detail" in body:  # FastAPI: route missing, body invalid
            message = str(body["detail"])
    exc = api_error_for_status(resp.status_code, f"vLLM {path}: {message}", provider="vllm", body=body,
                               request_id=resp.headers.get("x-request-id"))
    if resp.status_code == 404 and path.endswith("_lora_adapter") and message == "Not Found":
        exc.hint = ("runtime LoRA updating is off on this server: start vLLM with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (plans from plan_vllm set it)")
    elif "already been loaded" in message:
        exc.hint = "unload it first (unload_adapter), or load it under another name"
    elif "No adapter found" in message:
        exc.hint = "the path must exist on the vLLM server's machine and hold adapter_config.json"
    elif "cannot be found" in message:
        exc.hint = "list what is loaded with models()"
    elif resp.status_code == 401:
        exc.hint = "pass the server's API key: VllmClient(url, api_key=...)"
    return exc
