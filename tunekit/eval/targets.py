"""What a TARGET string names, and how to reach it through the `openai` client.

    URL#MODEL                      a model behind any OpenAI-compatible endpoint (vLLM, a provider, ...)
    MODEL with base_url=URL        the same, the endpoint given once for every such target
    adapter directory              a PEFT LoRA adapter, served over its base by the embedded engine
    registry id / name / job id    a registered adapter: local ones as above; managed ones at their provider
    model directory                a merged or base model (config.json), served by the embedded engine
    anything else                  a base model id (Hugging Face), served by the embedded engine

Local targets over the same base share one engine, so the base and its adapters decode in one batch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError

# OpenAI-compatible inference endpoints of the managed backends, where their keys are read from, and the
# endpoint override (OpenAI's and Together's SDK base URLs serve inference too; Fireworks' does not).
PROVIDER_ENDPOINTS = {
    "openai": ("https://api.openai.com/v1", ("OPENAI_API_KEY",), "OPENAI_BASE_URL"),
    "together": ("https://api.together.xyz/v1", ("TOGETHER_API_KEY",), "TOGETHER_BASE_URL"),
    "fireworks": ("https://api.fireworks.ai/inference/v1", ("FIREWORKS_API_KEY",), None),
}


@dataclass
class Target:
    name: str  # as the user gave it: the label in reports
    kind: str  # adapter | model | remote
    model: str  # the model id sent to the endpoint (local: the served name, filled in by the runner)
    base_model: str | None = None  # local: the model directory or hub id the engine loads
    adapter_path: Path | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    adapter_id: str | None = None  # the registry entry results are recorded on
    provider: str = "openai-compatible"

    @property
    def local(self) -> bool:
        return self.kind != "remote"

    def identity(self) -> str:
        """What the answers depend on: part of the resume cache key (a retrained adapter is a new target)."""
        if self.kind == "remote":
            return f"remote:{self.base_url}#{self.model}"
        parts = [self.kind, str(self.base_model)]
        if self.adapter_path is not None:
            parts.append(str(self.adapter_path.resolve()))
            for f in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
                p = self.adapter_path / f
                if p.is_file():
                    parts.append(hashlib.sha256(p.read_bytes()).hexdigest())
        return "|".join(parts)


def resolve_target(ref: str, *, base_url: str | None = None, api_key: str | None = None,
                   base_model: str | None = None) -> Target:
    """Resolve one TARGET string (see the module docstring)."""
    from ..adapters.info import read_adapter
    from ..adapters.resolve import locate, may_name_a_model, registered_at

    if "#" in ref and ref.split("#", 1)[0].startswith(("http://", "https://")):
        url, model = ref.split("#", 1)
        if not model:
            raise ConfigError(f"target {ref!r} names no model after '#'", field="target",
                              hint="write URL#MODEL, e.g. http://127.0.0.1:8000/v1#my-model")
        return Target(ref, "remote", model, base_url=url.rstrip("/"), api_key=api_key)
    if base_url:
        return Target(ref, "remote", ref, base_url=base_url.rstrip("/"), api_key=api_key)
    if may_name_a_model(ref):
        path = Path(ref).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise ConfigError(f"{path} is neither an adapter directory nor a model directory", field="target",
                              hint="pass an adapter dir (adapter_config.json), a model dir (config.json), a registry "
                                   "id, or URL#MODEL")
        return Target(ref, "model", ref, base_model=str(path) if path.exists() else ref)
    found = locate(ref)  # an adapter, or AdapterNotFoundError saying why not
    if found.record is not None:
        return _from_record(ref, found, api_key, base_model)
    info = read_adapter(found.path)
    base = base_model or info.base_model
    if not base:
        raise ConfigError(f"{found.path}: the adapter does not name its base model", field="base_model",
                          hint="pass --base-model (base_model=...)")
    registered = registered_at(found.path)
    return Target(ref, "adapter", ref, base_model=base, adapter_path=found.path,
                  adapter_id=registered.id if registered else None)


def _from_record(ref: str, found: Any, api_key: str | None, base_model: str | None) -> Target:
    record = found.record
    if found.path is not None:  # a local adapter (its directory exists: locate checked)
        return Target(ref, "adapter", ref, base_model=base_model or record.base_model, adapter_path=found.path,
                      adapter_id=record.id)
    if record.backend not in PROVIDER_ENDPOINTS:
        raise ConfigError(f"registry adapter {record.id} is on backend {record.backend!r}, whose inference "
                          "endpoint tunekit does not know", field="target",
                          hint="pass it as URL#MODEL with the endpoint that serves it")
    from .._settings import env_credential

    default_url, key_vars, url_var = PROVIDER_ENDPOINTS[record.backend]
    key = api_key or env_credential(*key_vars)
    if not key:
        raise ConfigError(f"{ref}: evaluating a {record.backend} model needs {key_vars[0]}", field="api_key",
                          hint=f"export {key_vars[0]}=..., or pass --api-key")
    url = (os.environ.get(url_var) if url_var else None) or default_url
    return Target(ref, "remote", record.location, base_url=url, api_key=key, adapter_id=record.id,
                  provider=record.backend)
