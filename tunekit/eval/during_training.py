"""Generative evaluation during local training: every N optimizer steps, greedy answers to a few held-out
prompts, scored with the metrics of ``tunekit eval`` and reported into the job's metric stream (split "eval").

    provider_options={"local": {"eval_generate": {"steps": 50, "rows": 8, "max_tokens": 64,
                                                  "metrics": ["exact_match", "contains"]}}}

Off unless asked for. The rows are the first ``rows`` of the validation file, read and converted as
``tunekit eval`` reads them; the model answers as trained (prompt/response rows: the raw prompt; chat rows:
the chat template with the generation prompt). Decoding is greedy, so a figure moves only when the weights
do. Cost per evaluation: at most rows x max_tokens generated tokens (``tokens_per_eval``, shown in the plan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .._exceptions import ConfigError
from .metrics import TEXT_METRICS, check_metrics, scorer

FIELD = "provider_options.local.eval_generate"
DEFAULTS = {"rows": 8, "max_tokens": 64, "metrics": ["exact_match", "contains"]}
LIMITS = {"steps": 10**9, "rows": 1024, "max_tokens": 4096}


def check_options(value: Any) -> dict[str, Any]:
    """The option, validated and completed with defaults, plus its cost bound ``tokens_per_eval``."""
    if not isinstance(value, dict) or "steps" not in value:
        raise ConfigError(f"{FIELD} must be an object with at least 'steps', not {value!r}", field=FIELD,
                          hint='e.g. {"steps": 50, "rows": 8, "max_tokens": 64, "metrics": ["exact_match"]}')
    unknown = sorted(set(value) - {*LIMITS, "metrics"})
    if unknown:
        raise ConfigError(f"{FIELD}: unknown key(s) {', '.join(unknown)}", field=FIELD,
                          hint="use steps, rows, max_tokens, metrics")
    out = {**DEFAULTS, **value}
    for key, top in LIMITS.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise ConfigError(f"{FIELD}.{key} must be an integer in 1..{top}, not {v!r}", field=f"{FIELD}.{key}")
    metrics = out["metrics"]
    if isinstance(metrics, str) or not isinstance(metrics, list):
        raise ConfigError(f"{FIELD}.metrics must be a list of metric names", field=f"{FIELD}.metrics")
    wrong = [m for m in metrics if not isinstance(m, str) or m.partition(":")[0] not in TEXT_METRICS]
    if wrong:
        raise ConfigError(f"{FIELD}.metrics: {wrong[0]!r} is not a text metric", field=f"{FIELD}.metrics",
                          hint=f"use {', '.join(TEXT_METRICS)} (or regex:PATTERN); loss is validation loss already")
    out["metrics"] = check_metrics(metrics)
    out["tokens_per_eval"] = out["rows"] * out["max_tokens"]
    return out


def generative_eval_callback(options: dict[str, Any], validation_path: str | Path, tokenizer: Any,
                             report: Callable[[int, dict[str, Any]], None]) -> Any:
    """A transformers ``TrainerCallback`` that scores greedy answers every ``options["steps"]`` optimizer steps,
    passing ``{metric: value, "generated_rows": n}`` to ``report(step, values)``."""
    from transformers import TrainerCallback

    from .run import load_rows

    opts = check_options(options)
    rows = load_rows(validation_path)[0][: opts["rows"]]
    if not rows:
        raise ConfigError(f"{FIELD}: the validation file has no rows to generate from", field=FIELD)
    prompts = [_prompt_ids(tokenizer, r) for r in rows]
    scorers = {m: scorer(m) for m in opts["metrics"]}

    class GenerativeEval(TrainerCallback):
        def __init__(self) -> None:
            self.answers: list[str] = []  # of the last evaluation (for tests and debugging)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % opts["steps"] == 0:
                self.evaluate(model, int(state.global_step))

        def evaluate(self, model: Any, step: int) -> None:
            self.answers = _greedy_answers(model, tokenizer, prompts, opts["max_tokens"])
            values: dict[str, Any] = {m: sum(score(a, r.reference) for a, r in zip(self.answers, rows)) / len(rows)
                                      for m, score in scorers.items()}
            report(step, {**values, "generated_rows": len(rows)})

    return GenerativeEval()


def _prompt_ids(tokenizer: Any, row: Any) -> list[int]:
    if row.prompt is not None:  # prompt/response rows train on prompt + completion as plain text
        return tokenizer(row.prompt)["input_ids"]
    return list(tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True))


def _greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """One row at a time (no padding to get wrong), in eval mode, training mode restored after."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    try:
        with torch.no_grad():
            for ids in prompts:
                x = torch.tensor([ids], device=device)
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=pad, use_cache=True)
                answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
