"""The registry entry of a locally trained adapter: enough to say exactly what produced it.

Recorded: sha256 of the training/validation files (checked against the hashes taken at submit, so a
file edited while the job ran is flagged), the base model id and revision (the Hugging Face commit when
it came from the hub cache, a fingerprint of config + weight files for a local directory), hashes of
the tokenizer vocabulary and chat template, the resolved training config, library versions, final
metrics, owner and creation time.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..store import AdapterRecord, JobRecord, Store

LIBRARIES = ("tunekit", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
             "safetensors", "tokenizers")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def base_model_revision(base_model: str) -> dict[str, Any]:
    """Where the base weights came from, precisely enough to get the same ones again."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        h = hashlib.sha256()
        for p in files:  # weights by name + size (hashing GBs of weights would stall the job)
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            if p.name in ("config.json", "model.safetensors.index.json"):
                h.update(p.read_bytes())
        return {"source": "local_dir", "path": str(path.resolve()), "revision": None,
                "fingerprint": h.hexdigest()}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json")
    except Exception:  # noqa: BLE001 - no hub library or an odd id: the id alone is still recorded
        cached = None
    revision = None
    if isinstance(cached, str) and "/snapshots/" in cached:
        revision = cached.split("/snapshots/")[1].split("/")[0]  # the commit hash of the cached snapshot
    return {"source": "huggingface", "path": None, "revision": revision, "fingerprint": None}


def tokenizer_hashes(tokenizer: Any) -> dict[str, str | None]:
    """sha256 of the vocabulary (+ special tokens) and of the chat template."""
    if tokenizer is None:
        return {"vocab_sha256": None, "chat_template_sha256": None}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {"vocab_sha256": text_sha256(vocab + specials), "chat_template_sha256": text_sha256(template)}


def data_hashes(record: "JobRecord") -> dict[str, dict[str, Any]]:
    """Hash the job's data files now and compare with the hashes taken when it was submitted."""
    out: dict[str, dict[str, Any]] = {}
    for split, entry in (record.data or {}).items():
        path = entry.get("path")
        now = file_sha256(path) if path and Path(path).is_file() else None
        out[split] = {"path": path, "sha256": now or entry.get("sha256"), "rows": entry.get("rows"),
                      "kind": entry.get("kind"), "sha256_at_submit": entry.get("sha256"),
                      "changed_since_submit": bool(now and entry.get("sha256") and now != entry["sha256"])}
    return out


def build_info(record: "JobRecord", *, base_model_id: str, resolved_config: dict[str, Any],
               metrics: dict[str, Any], tokenizer: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "job_id": record.id,
        "owner": getpass.getuser(),
        "host": socket.gethostname(),
        "created_at": time.time(),
        "data": data_hashes(record),
        "base_model": {"id": base_model_id, **base_model_revision(base_model_id)},
        "tokenizer": tokenizer_hashes(tokenizer),
        "config": resolved_config,
        "spec": record.spec,
        "libraries": library_versions(),
        "metrics": metrics,
        **(extra or {}),
    }


def register(store: "Store", record: "JobRecord", adapter_dir: str | Path, info: dict[str, Any],
             *, name: str | None = None) -> "AdapterRecord":
    """Add the adapter to the registry with its provenance; ``data_sha256`` is the training file's."""
    train = info.get("data", {}).get("train", {})
    return store.add_adapter(backend="local", job_id=record.id, location=str(Path(adapter_dir).resolve()),
                             base_model=info["base_model"]["id"], data_sha256=train.get("sha256"), info=info,
                             name=name)
