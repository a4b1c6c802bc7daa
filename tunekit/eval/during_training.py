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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, field_validator, model_validator

from .._exceptions import ConfigError
from .metrics import TEXT_METRICS, scorer

FIELD = "provider_options.local.eval_generate"


class GenerateEvalOptions(BaseModel):
    """``provider_options.local.eval_generate``: strict like the other local options (a typo is refused)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    steps: int = Field(ge=1, le=10**9, description="generate and score every N optimizer steps")
    rows: int = Field(8, ge=1, le=1024, description="the first N rows of the validation file (default 8)")
    max_tokens: int = Field(64, ge=1, le=4096, description="tokens generated per row at most (default 64)")
    metrics: list[str] = Field(["exact_match", "contains"], min_length=1,
                               description=f"any of {', '.join(TEXT_METRICS)}, regex:PATTERN (default exact_match, "
                                           "contains)")

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, value: Any) -> Any:
        """A stored run is read back with its computed tokens_per_eval: accepted when it is still true."""
        if isinstance(value, dict) and "tokens_per_eval" in value:
            value = dict(value)
            given = value.pop("tokens_per_eval")
            rows = value.get("rows", cls.model_fields["rows"].default)
            max_tokens = value.get("max_tokens", cls.model_fields["max_tokens"].default)
            if given != rows * max_tokens:
                raise ValueError("tokens_per_eval is derived (rows x max_tokens): leave it out")
        return value

    @field_validator("metrics")
    @classmethod
    def _text_metrics(cls, metrics: list[str]) -> list[str]:
        for m in metrics:
            if m.partition(":")[0] not in TEXT_METRICS:
                raise ValueError(f"{m!r} is not a text metric (validation loss is already reported)")
            try:
                scorer(m)  # a bad regex:PATTERN fails here, before training
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return list(dict.fromkeys(metrics))

    @computed_field  # the cost bound, shown in the plan
    @property
    def tokens_per_eval(self) -> int:
        return self.rows * self.max_tokens


def check_options(value: Any) -> GenerateEvalOptions:
    """The option validated (defaults filled); a ConfigError naming the field otherwise."""
    if isinstance(value, GenerateEvalOptions):
        return value
    try:
        return GenerateEvalOptions.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([FIELD, *(str(p) for p in err["loc"])])
        raise ConfigError(f"{where}: {err['msg']}", field=where,
                          hint='e.g. {"steps": 50, "rows": 8, "max_tokens": 64, "metrics": ["exact_match"]}') from None


def check_plan(options: GenerateEvalOptions | None, validation_data: str | None, ranks: int = 1,
               sharded: bool = False) -> None:
    """At plan time: the option needs held-out rows to generate from, and one unsharded process. Under several
    ranks each would generate (the same answers, N times), and under FSDP2 a generate on one rank alone would
    wait forever for the others' weight all-gathers; FSDP2 at world size 1 (a check of the sharded path) is
    refused too: generating through the sharded modules has not been run on a GPU."""
    if options is not None and not validation_data:
        raise ConfigError(f"{FIELD} generates answers to validation rows, but the spec has no validation_data",
                          field=FIELD, hint="set validation_data (held-out rows), or drop eval_generate")
    if options is not None and ranks > 1:
        raise ConfigError(f"{FIELD} runs in one process; this run trains on {ranks} ranks", field=FIELD,
                          hint="drop eval_generate (the validation loss is still computed on every rank), or "
                               "train with gpus=1; `tunekit eval` scores the finished adapter the same way")
    if options is not None and sharded:
        raise ConfigError(f"{FIELD} runs in one unsharded process; this run shards the model with FSDP2",
                          field=FIELD, hint="drop eval_generate or layout='fsdp2'; `tunekit eval` scores the "
                                            "finished adapter the same way")


def add_to_trainer(trainer: Any, options: Any, validation_path: str | Path | None, tokenizer: Any,
                   report: Callable[[int, dict[str, Any]], None]) -> None:
    """Add the callback to a transformers Trainer when ``options`` (the eval_generate value) is set."""
    if not options:
        return
    if validation_path is None:
        raise ConfigError(f"{FIELD} needs validation data to generate from", field=FIELD,
                          hint="set validation_data (held-out rows), or drop eval_generate")
    trainer.add_callback(generative_eval_callback(options, validation_path, tokenizer, report))


def generative_eval_callback(options: GenerateEvalOptions | dict[str, Any], validation_path: str | Path, tokenizer: Any,
                             report: Callable[[int, dict[str, Any]], None]) -> Any:
    """A transformers ``TrainerCallback`` that scores greedy answers every ``options.steps`` optimizer steps,
    passing ``{metric: value, "generated_rows": n}`` to ``report(step, values)``."""
    from transformers import TrainerCallback

    from .run import load_rows

    opts = check_options(options)
    rows = load_rows(validation_path)[0][: opts.rows]
    if not rows:
        raise ConfigError(f"{FIELD}: the validation file has no rows to generate from", field=FIELD)
    prompts = [_prompt_ids(tokenizer, r) for r in rows]
    scorers = {m: scorer(m) for m in opts.metrics}

    class GenerativeEval(TrainerCallback):
        def __init__(self) -> None:
            self.answers: list[str] = []  # of the last evaluation (for tests and debugging)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % opts.steps == 0:
                self.evaluate(model, int(state.global_step))

        def evaluate(self, model: Any, step: int) -> None:
            self.answers = _greedy_answers(model, tokenizer, prompts, opts.max_tokens)
            values: dict[str, Any] = {m: sum(score(a, r.reference) for a, r in zip(self.answers, rows)) / len(rows)
                                      for m, score in scorers.items()}
            report(step, {**values, "generated_rows": len(rows)})

    return GenerativeEval()


def _prompt_ids(tokenizer: Any, row: Any) -> list[int]:
    if row.prompt is not None:  # prompt/response rows train on prompt + completion as plain text
        return tokenizer(row.prompt)["input_ids"]
    out = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


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
