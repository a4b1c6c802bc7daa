"""Validated JSONL rows -> the datasets TRL trains on.

    prompt/response -> {"prompt", "completion"} (TRL prompt-completion; `completion_only_loss` masks the prompt)
    chat            -> pre-tokenized {"input_ids", "assistant_masks"}: TRL turns the mask into labels, so only
                       assistant turns are learned; turns with `"weight": 0` are cleared from the mask here
                       (TRL has no per-message weight).
    preference      -> {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]} (TRL DPO,
                       conversational; the chat template is applied by TRL)

The assistant mask comes from the tokenizer's own `return_assistant_tokens_mask` (the chat template's
`{% generation %}` markers). A template without markers is swapped for TRL's training twin when TRL knows
it (Llama 3, Qwen, Gemma, ...); otherwise each assistant turn's tokens are found by rendering the
conversation up to that turn (needs a prefix-preserving template; refused clearly when not).

Examples longer than ``max_length`` are truncated by TRL (keeping the start); they are counted here,
as are examples left with no trained token (TRL drops those).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._exceptions import ConfigError

_STRIP_KEYS = ("weight",)  # tunekit-only message keys the chat template must not see


@dataclass
class PreparedData:
    """What `train` hands to TRL, plus the facts the outcome reports."""

    records: list[dict[str, Any]]
    row_kind: str  # prompt_response | chat | preference
    trl_format: str  # prompt_completion | tokenized_chat | preference
    truncated_count: int = 0
    no_loss_count: int = 0  # examples with no trained token (all weight 0, or truncated away): TRL drops them
    masking: str | None = None  # how assistant tokens were found: markers | trl_training_template | prefix
    chat_template: str | None = None  # the template actually used for tokenizing (None: tokenizer's own)
    lines: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per SFT example (what packing decides from)

    @property
    def mean_tokens(self) -> float | None:
        return sum(self.lengths) / len(self.lengths) if self.lengths else None

    def __len__(self) -> int:
        return len(self.records)


def load_rows(path: str | Path) -> list[tuple[int, dict]]:
    from tunekit.data.convert import iter_rows

    rows = list(iter_rows(path))
    if not rows:
        raise ConfigError(f"{path}: no rows", field="data", hint="the training file must contain at least one row")
    return rows


def row_kind(rows: list[tuple[int, dict]], path: str | Path = "data") -> str:
    """The one row kind of a file (mixed kinds are refused with the first offending line)."""
    from tunekit.data._checks import guess_kind

    first = guess_kind(rows[0][1])
    if first is None:
        raise ConfigError(f"{path}:{rows[0][0]}: not a known row kind", field="data",
                          hint=f"run `tunekit validate {path}`")
    for line, row in rows:
        k = guess_kind(row)
        if k is not first:
            raise ConfigError(
                f"{path}:{line}: row kind {k} differs from the file's first row ({first})", field="data",
                hint="put one row kind per file; `tunekit validate` reports the kind of each file",
            )
    return first.value


def prepare(
    path: str | Path, tokenizer: Any, *, method: str, max_length: int
) -> PreparedData:
    """Read a validated JSONL file and build the TRL-ready records for ``method`` ('sft' or 'dpo')."""
    rows = load_rows(path)
    kind = row_kind(rows, path)
    if method == "dpo":
        if kind != "preference":
            raise ConfigError(
                f"method='dpo' needs preference rows (input / preferred_output / non_preferred_output); {path} has {kind} rows",
                field="method", hint="use method='sft' for this file, or give a preference file",
            )
        return build_preference(rows, tokenizer, max_length=max_length)
    if kind == "prompt_response":
        return build_prompt_completion(rows, tokenizer, max_length=max_length)
    if kind == "preference":  # SFT on the preferred answer, as tunekit.data.convert defines it
        from tunekit.data.convert import to_chat_row

        rows = [(line, to_chat_row(row, "preference")) for line, row in rows]
    return build_chat(rows, tokenizer, max_length=max_length)


# ---------------------------------------------------------------- prompt/response

def build_prompt_completion(rows: list[tuple[int, dict]], tokenizer: Any, *, max_length: int) -> PreparedData:
    records, truncated, no_loss, lengths = [], 0, 0, []
    eos = tokenizer.eos_token or ""
    for _, row in rows:
        answer = row["response"] if "response" in row else row["completion"]
        records.append({"prompt": row["prompt"], "completion": answer})
        ex = prompt_completion_example(tokenizer, row["prompt"], answer + eos)
        lengths.append(min(len(ex["input_ids"]), max_length))
        truncated += len(ex["input_ids"]) > max_length
        no_loss += not any(ex["completion_mask"][:max_length])
    return PreparedData(records, "prompt_response", "prompt_completion", truncated, no_loss,
                        lines=[line for line, _ in rows], lengths=lengths)


def prompt_completion_example(tokenizer: Any, prompt: str, completion: str) -> dict:
    """input_ids + completion_mask of one prompt/completion pair, tokenized as TRL's SFT does.

    The completion (EOS already appended, as TRL does) starts where the tokenized prompt and the tokenized
    prompt+completion diverge, which is not always after the prompt when tokens merge across the boundary.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    return {"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)}


# ---------------------------------------------------------------- chat

def has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def choose_chat_masking(tokenizer: Any) -> tuple[str, str | None]:
    """('markers'|'trl_training_template'|'prefix', template to use or None for the tokenizer's own)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError(
            "the base model's tokenizer has no chat template, so chat rows cannot be rendered",
            field="base_model",
            hint="use an instruct/chat model, or train on prompt/response rows instead",
        )
    if has_generation_markers(template):
        return "markers", None
    try:
        from trl.chat_template_utils import get_training_chat_template

        patched = get_training_chat_template(tokenizer)
        if patched:
            return "trl_training_template", patched
    except (ImportError, ValueError):
        pass
    return "prefix", None


def _ids(tokenizer: Any, messages: list[dict], template: str | None, tools: Any, **kw: Any) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=True, return_dict=True, **kw
    )
    return list(out["input_ids"])


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, bit in enumerate(list(mask) + [0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _prefix_spans(
    tokenizer: Any, msgs: list[dict], tools: Any, full: list[int], template: str | None
) -> list[tuple[int, int]]:
    """Token span of each assistant turn, found by rendering the conversation up to it."""
    spans = []
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        upto = _ids(tokenizer, msgs[: j + 1], template, tools)
        start = 0
        if j:
            before = _ids(tokenizer, msgs[:j], template, tools, add_generation_prompt=True)
            start = next((i for i, (a, b) in enumerate(zip(before, upto)) if a != b), min(len(before), len(upto)))
        if full[: len(upto)] != upto:
            raise ConfigError(
                "the chat template renders earlier turns differently once later turns follow (not prefix-preserving), "
                "so tunekit cannot tell which tokens are the assistant's",
                field="base_model",
                hint="add {% generation %}...{% endgeneration %} around assistant content in the tokenizer's chat "
                "template (tokenizer_config.json), or train on prompt/response rows",
            )
        spans.append((start, len(upto)))
    return spans


def chat_example(tokenizer: Any, messages: list[dict], tools: Any, masking: str, template: str | None) -> dict:
    """input_ids + assistant_masks for one conversation, with weight-0 assistant turns unmasked."""
    clean = [{k: v for k, v in m.items() if k not in _STRIP_KEYS} for m in messages]
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    spans = None
    if masking in ("markers", "trl_training_template"):
        enc = tokenizer.apply_chat_template(
            clean, tools=tools, chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = list(enc["input_ids"])
        spans = _runs(list(enc["assistant_masks"]))
        if len(spans) != len(weights):  # e.g. an empty generation block: fall back to rendering turn by turn
            spans = None
    if spans is None:
        ids = _ids(tokenizer, clean, template, tools)
        spans = _prefix_spans(tokenizer, clean, tools, ids, template)
    mask = [0] * len(ids)
    for (a, b), w in zip(spans, weights):
        if w:
            mask[a:b] = [1] * (b - a)
    return {"input_ids": ids, "assistant_masks": mask}


def build_chat(rows: list[tuple[int, dict]], tokenizer: Any, *, max_length: int) -> PreparedData:
    masking, template = choose_chat_masking(tokenizer)
    records, truncated, no_loss = [], 0, 0
    for line, row in rows:
        try:
            ex = chat_example(tokenizer, row["messages"], row.get("tools"), masking, template)
        except ConfigError:
            raise
        except Exception as exc:  # a template error (e.g. raise_exception on role order) names the line
            raise ConfigError(f"line {line}: the chat template could not render this conversation: {exc}",
                              field="data", hint="check the role order the model's chat template expects") from exc
        truncated += len(ex["input_ids"]) > max_length
        no_loss += not any(ex["assistant_masks"][:max_length])
        records.append(ex)
    return PreparedData(records, "chat", "tokenized_chat", truncated, no_loss, masking=masking,
                        chat_template=template, lines=[line for line, _ in rows],
                        lengths=[min(len(r["input_ids"]), max_length) for r in records])


# ---------------------------------------------------------------- preference (DPO)

def build_preference(rows: list[tuple[int, dict]], tokenizer: Any, *, max_length: int) -> PreparedData:
    if not tokenizer.chat_template:
        raise ConfigError("DPO on preference rows needs a chat template; the base model's tokenizer has none",
                          field="base_model", hint="use an instruct/chat base model")
    records, truncated, no_loss = [], 0, 0
    for _, row in rows:
        tools = row["input"].get("tools")
        prompt = [_clean(m) for m in row["input"]["messages"]]
        rec: dict[str, Any] = {
            "prompt": prompt,
            "chosen": [_clean(m) for m in row["preferred_output"]],
            "rejected": [_clean(m) for m in row["non_preferred_output"]],
        }
        if tools:
            rec["tools"] = json.dumps(tools)  # TRL json-decodes string tools; keeps the Arrow schema simple
        records.append(rec)
        p = len(_ids(tokenizer, prompt, None, tools, add_generation_prompt=True))
        c = len(_ids(tokenizer, prompt + rec["chosen"], None, tools))
        r = len(_ids(tokenizer, prompt + rec["rejected"], None, tools))
        truncated += max(c, r) > max_length
        no_loss += p >= max_length
    if any("tools" in r for r in records):
        for r in records:
            r.setdefault("tools", None)
    return PreparedData(records, "preference", "preference", truncated, no_loss, lines=[line for line, _ in rows])


def _clean(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in _STRIP_KEYS}
