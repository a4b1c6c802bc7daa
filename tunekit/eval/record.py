"""Eval results on the adapter registry entry: ``info["evals"]``, newest last.

Each entry keeps what a figure means: the data file and its sha256, the decoding settings, the judge and
its baseline, and the other targets of the run. Targets that are not registry adapters (a base model,
an unregistered directory, an endpoint) are reported but have nowhere to be recorded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .result import EvalResult


def record_results(result: EvalResult) -> list[str]:
    from ..store import default_store

    store = default_store()
    recorded = []
    for t in result.targets:
        if not t.adapter_id:
            continue
        data = {**result.data, "path": str(Path(result.data["path"]).resolve())}  # a record outlives the cwd
        entry = {"at": time.time(), "data": data, "settings": result.settings, "judge": result.judge,
                 "metrics": t.metrics, "ci": {k: list(v) for k, v in t.ci.items()}, "judge_result": t.judge,
                 "target": t.target, "compared_with": [o.target for o in result.targets if o is not t]}
        current = store.get_adapter(t.adapter_id)
        store.update_adapter(t.adapter_id, info={"evals": [*current.info.get("evals", []), entry]})
        recorded.append(t.adapter_id)
    return recorded


def latest_evals(info: dict[str, Any]) -> list[dict[str, Any]]:
    return list(info.get("evals") or [])


def latest_metric(info: dict[str, Any], metric: str, data_sha256: str | None = None) -> float | None:
    """The newest recorded value of ``metric`` (on ``data_sha256`` when given)."""
    for entry in reversed(latest_evals(info)):
        if data_sha256 and entry.get("data", {}).get("sha256") != data_sha256:
            continue
        if metric in entry.get("metrics", {}):
            return entry["metrics"][metric]
    return None

