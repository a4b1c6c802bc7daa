"""Serving adapters: the embedded OpenAI-compatible server and the vLLM launcher.

    from tunekit.serve import serve
    serve("meta-llama/Llama-3.1-8B-Instruct", {"sql": "runs/sql/adapter"})          # picks the engine
    serve(..., engine="embedded")   # transformers + hot-swapped LoRA slots, CPU or GPU
    serve(..., engine="vllm")       # plan_vllm() checks + `vllm serve --enable-lora ...`

Nothing heavy is imported until a server starts.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["VllmClient", "VllmPlan", "create_app", "launch", "plan_vllm", "pick_engine", "serve",
           "start_in_thread"]

_LAZY = {
    "VllmClient": ".vllm", "VllmPlan": ".vllm", "launch": ".vllm", "plan_vllm": ".vllm",
    "create_app": ".embedded.app", "start_in_thread": ".embedded.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


def pick_engine(engine: str | None = None) -> str:
    """``engine`` if given, else "vllm" when vLLM is importable and a CUDA GPU is visible, else "embedded"."""
    from .._exceptions import ConfigError

    if engine is not None:
        if engine not in ("vllm", "embedded"):
            raise ConfigError(f"engine {engine!r} is not 'vllm' or 'embedded'", field="engine")
        return engine
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "embedded"
    import torch

    return "vllm" if torch.cuda.is_available() else "embedded"


def serve(base_model: str, adapters: dict[str, str] | None = None, *, engine: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, max_loras: int | None = None, api_key: str | None = None,
          block: bool = True, **kwargs: Any) -> Any:
    """Serve ``base_model`` with ``adapters`` (name -> directory or registry key) on an OpenAI-compatible API.

    ``block=True`` runs until interrupted. ``block=False`` returns a handle with ``url`` and ``stop()``
    (a :class:`~tunekit.serve.vllm.VllmServer` or an embedded ``ServerHandle``). Extra keyword
    arguments go to :func:`plan_vllm` (vLLM) or :func:`create_app` (embedded).
    """
    chosen = pick_engine(engine)
    if chosen == "vllm":
        from .vllm import launch, plan_vllm

        plan = plan_vllm(base_model, adapters or {}, max_loras=max_loras, port=port, host=host, api_key=api_key,
                         **kwargs)
        server = launch(plan)
        if not block:
            return server
        try:
            server.wait()
        finally:
            server.stop()
        return None
    from .embedded.server import run, start_in_thread

    opts = {"max_loras": max_loras or 4, "api_key": api_key, **kwargs}
    if not block:
        return start_in_thread(base_model, adapters, host=host, port=port, **opts)
    run(base_model, adapters, host=host, port=port, **opts)
    return None
