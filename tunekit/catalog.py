"""Canonical model names -> each backend's id (and the Hugging Face id the local backend loads).

A name not in the catalog is taken as the backend's own id and passed through unchanged. A canonical
name that a backend does not offer is an error naming the backends that do.
"""

from __future__ import annotations

from ._exceptions import UnknownModelError

# backend -> id. "local" is the Hugging Face id. Ids from the providers' model pages (see
# docs/backends/); a provider may rename them: a native id always works too.
CATALOG: dict[str, dict[str, str]] = {
    "llama-3.1-8b-instruct": {
        "together": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
        "fireworks": "accounts/fireworks/models/llama-v3p1-8b-instruct",
        "local": "meta-llama/Llama-3.1-8B-Instruct",
    },
    "llama-3.1-70b-instruct": {
        "together": "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference",
        "fireworks": "accounts/fireworks/models/llama-v3p1-70b-instruct",
        "local": "meta-llama/Llama-3.1-70B-Instruct",
    },
    "llama-3.2-3b-instruct": {
        "together": "meta-llama/Llama-3.2-3B-Instruct",
        "fireworks": "accounts/fireworks/models/llama-v3p2-3b-instruct",
        "local": "meta-llama/Llama-3.2-3B-Instruct",
    },
    "qwen2.5-7b-instruct": {
        "together": "Qwen/Qwen2.5-7B-Instruct",
        "fireworks": "accounts/fireworks/models/qwen2p5-7b-instruct",
        "local": "Qwen/Qwen2.5-7B-Instruct",
    },
    "qwen2.5-14b-instruct": {
        "together": "Qwen/Qwen2.5-14B-Instruct",
        "fireworks": "accounts/fireworks/models/qwen2p5-14b-instruct",
        "local": "Qwen/Qwen2.5-14B-Instruct",
    },
    "mistral-7b-instruct-v0.2": {
        "together": "mistralai/Mistral-7B-Instruct-v0.2",
        "local": "mistralai/Mistral-7B-Instruct-v0.2",
    },
    "gpt-4o-mini": {"openai": "gpt-4o-mini-2024-07-18"},
    "gpt-4.1": {"openai": "gpt-4.1-2025-04-14"},
    "gpt-4.1-mini": {"openai": "gpt-4.1-mini-2025-04-14"},
    "gpt-4.1-nano": {"openai": "gpt-4.1-nano-2025-04-14"},
}


def resolve_model(name: str, backend: str) -> str:
    """The id ``backend`` knows ``name`` by; native ids pass through."""
    entry = CATALOG.get(name.lower())
    if entry is None:
        return name
    if backend in entry:
        return entry[backend]
    offered = ", ".join(sorted(entry))
    raise UnknownModelError(
        f"{name!r} is not offered by backend {backend!r}; backends that offer it: {offered}",
        field="base_model",
        hint=f"use backend={sorted(entry)[0]!r}, or give {backend}'s own model id as base_model",
    )


def canonical_name(model_id: str) -> str | None:
    """The canonical name of a backend id (e.g. to move a managed job to local), if catalogued."""
    lowered = model_id.lower()
    for name, ids in CATALOG.items():
        if lowered == name or lowered in (i.lower() for i in ids.values()):
            return name
    return None
