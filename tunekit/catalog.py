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


# Training prices, USD per 1M trained tokens (LoRA SFT; tokens x epochs), for cost estimates before launch.
# Dated and sourced: re-check the page before trusting a figure; a provider's own estimate (Together's
# estimate-price) wins where its API has one. By model id (OpenAI) or by model size in billions (the
# smallest "up to" row that fits).
TRAINING_PRICES: dict[str, dict] = {
    "openai": {"as_of": "2025-06", "source": "https://openai.com/api/pricing/ (fine-tuning, training)",
               "models": {"gpt-4o-mini-2024-07-18": 3.00, "gpt-4o-2024-08-06": 25.00, "gpt-4.1-2025-04-14": 25.00,
                          "gpt-4.1-mini-2025-04-14": 5.00, "gpt-4.1-nano-2025-04-14": 1.50}},
    "together": {"as_of": "2025-06", "source": "https://www.together.ai/pricing (fine-tuning, LoRA)",
                 "sizes": [(16, 0.48), (69, 1.50), (100, 2.90)]},
    "fireworks": {"as_of": "2025-06", "source": "https://fireworks.ai/pricing (fine-tuning, SFT)",
                  "sizes": [(16, 0.50), (80, 3.00), (300, 6.00)]},
}


def training_price(backend: str, model_id: str) -> tuple[float, str] | None:
    """(USD per 1M trained tokens, "source, as of date") for ``model_id`` on ``backend``, or None if unknown."""
    table = TRAINING_PRICES.get(backend)
    if table is None:
        return None
    where = f"{table['source']}, as of {table['as_of']}"
    if "models" in table:
        price = table["models"].get(model_id) or table["models"].get(resolve_model(model_id, backend))
        return (price, where) if price is not None else None
    billions = size_in_name(model_id)
    if billions is None:
        return None
    return next(((usd, where) for upto, usd in table["sizes"] if billions <= upto), None)


def size_in_name(model_id: str) -> float | None:
    """Billions of parameters a model id states ("...-3.1-8B-Instruct" -> 8, "qwen2p5-7b" -> 7), or None."""
    import re

    sizes = re.findall(r"(\d+(?:[.p]\d+)?)b(?![a-z])", model_id.lower())
    return float(sizes[-1].replace("p", ".")) if sizes else None


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
