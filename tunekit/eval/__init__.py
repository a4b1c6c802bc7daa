"""Evaluate and compare adapters, merged models, base models and remote endpoints on held-out data.

    result = tunekit.evaluate(["ad-1234", "runs/sql/adapter", "path/to/base"], "held_out.jsonl")
    print(result.to_markdown()); result.write("report.html"); result.to_json()

Modules: targets (what a TARGET names), metrics (scores, intervals), loss (held-out loss of local
targets), judge (pairwise LLM judge), cache (resume), report (Markdown/HTML), result (the values, rendered
by report), record (registry), during_training (generative eval inside a local run), run (the whole eval).
The imports between them form no circle (tests/test_eval_structure.py).
Importing this package imports no torch, transformers or SDK.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "evaluate"]


def __getattr__(name: str) -> Any:
    if name == "EvalResult":
        from .result import EvalResult

        return EvalResult
    if name == "evaluate":
        from .run import evaluate

        return evaluate
    raise AttributeError(name)
