"""Answers already fetched, one JSONL file per (target, data, settings): what makes an eval resumable.

Each finished call is appended and flushed at once, so an eval killed at any point loses at most the
calls in flight; the next run with the same target, data and settings reads the file and skips them.
A torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_dir(data_sha256: str) -> Path:
    from .._settings import tunekit_home

    return tunekit_home() / "evals" / data_sha256[:16]


class AnswerCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # torn last line: drop it, so the next append starts clean
                text = text[: text.rfind("\n") + 1]
                path.write_text(text, encoding="utf-8")
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                self.done[str(entry["key"])] = entry

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        entry = {"key": key, **value}
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
            self.done[key] = entry
