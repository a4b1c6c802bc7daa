"""Held-out loss and perplexity of a local target, on the tokens it was trained to produce.

The model is the one the embedded engine serves the target's answers from (loaded once per base, adapters
in its LoRA slots). The rows are tokenized and masked by the local backend's own code
(``backends/local/datasets.py``): completion tokens of prompt/response rows, assistant turns of chat rows (weight-0 turns excluded),
the preferred answer of preference rows. Loss is the mean negative log-likelihood per trained token
over the whole set; its interval is a bootstrap over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import bootstrap_ratio


@dataclass
class LossResult:
    nll: list[float]  # per row: summed negative log-likelihood of its trained tokens
    tokens: list[int]  # per row: trained tokens

    @property
    def loss(self) -> float:
        total = sum(self.tokens)
        return sum(self.nll) / total if total else math.nan

    def summary(self) -> dict[str, Any]:
        lo, hi = bootstrap_ratio(self.nll, self.tokens)
        return {"loss": (self.loss, (lo, hi)), "perplexity": (_exp(self.loss), (_exp(lo), _exp(hi)))}


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def masked_examples(data: str | Path, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, mask of trained tokens) per row, exactly as the local backend trains on them."""
    from ..backends.local.datasets import prepare, prompt_completion_example

    prepared = prepare(data, tokenizer, method="sft", max_length=max_length)
    out = []
    for rec in prepared.records:
        if prepared.trl_format == "prompt_completion":
            ex = prompt_completion_example(tokenizer, rec["prompt"], rec["completion"] + (tokenizer.eos_token or ""))
            ids, mask = ex["input_ids"], ex["completion_mask"]
        else:
            ids, mask = rec["input_ids"], rec["assistant_masks"]
        out.append((list(ids[:max_length]), list(mask[:max_length])))
    return out


def engine_loss(engine: Any, adapter: str | None, data: str | Path) -> LossResult:
    """Score every row, one at a time, on the model an embedded engine already holds (the weights the
    answers come from, loaded once), through ``adapter``'s slot (None: the base). The engine is paused
    meanwhile, so no batch re-routes the slots; this runs before any request is sent to it."""
    import torch

    dev = engine.device
    nll, tokens = [], []
    with engine.paused(), torch.inference_mode():
        engine.pool.slots.set_rows(engine.pool.acquire([adapter]))
        try:
            for ids, mask in masked_examples(data, engine.tokenizer, engine.max_model_len):
                x = torch.tensor([ids], device=dev)
                logits = engine.model(input_ids=x).logits[0, :-1].float()
                target = x[0, 1:]
                keep = torch.tensor(mask[1:], device=dev, dtype=torch.bool)
                lp = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0]
                nll.append(float(-(lp[keep]).sum()))
                tokens.append(int(keep.sum()))
        finally:
            engine.pool.slots.set_rows([0])
    return LossResult(nll, tokens)
