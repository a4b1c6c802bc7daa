"""Embedded OpenAI-compatible server: transformers base loaded once, LoRA adapters hot-swapped into
pre-allocated slots, requests for different adapters decoded together in one batch.

    from tunekit.serve.embedded import start_in_thread
    with start_in_thread("path/to/base", {"sql": "runs/sql/adapter"}) as srv:
        openai.OpenAI(base_url=srv.url + "/v1", api_key="-").completions.create(model="sql", prompt="...")

Importing this package does not import torch, transformers or FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "SamplingParams", "ServerHandle", "create_app", "run", "start_in_thread"]

_LAZY = {
    "create_app": ".app", "Engine": ".engine", "SamplingParams": ".engine",
    "run": ".server", "start_in_thread": ".server", "ServerHandle": ".server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
