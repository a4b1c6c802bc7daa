"""Build a training set from a live model's answers (``tunekit distill``), to keep a fine-tune's behaviour
after its weights can no longer be called (OpenAI retires GPT-4o and GPT-4.1 fine-tunes on 2027-01-14).

Any OpenAI-compatible chat endpoint works (the ``openai`` client with ``base_url``). Each prompt row (chat:
the messages before the last assistant turn; prompt/response: the prompt; preference: the input) is sent
once; the answer makes a chat row ``{"messages": [...prompt, {"role": "assistant", "content": answer}]}``,
checked by the data validator's row check before it is appended to the output. Calls run ``concurrency`` at
a time under the one retry policy. Rows are appended as answers arrive and the output is the only state:
a rerun skips every prompt already answered there (a torn last line from a kill is cut off), so an
interrupted run resumes without asking twice or writing a row twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .._exceptions import APIError, ConfigError
from .._retry import RetryPolicy
from ..schemas.rows import RowKind

if TYPE_CHECKING:
    from ..schemas.report import ValidationReport
    from ..store import Store

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text; the estimate says it is one

# USD per 1M tokens (input, output) to call a fine-tuned OpenAI model, by base model; openai.com/api/pricing,
# as listed in 2025. An estimate only: pass price= (--price IN,OUT) for any other model or a newer price.
FT_INFERENCE_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini-2024-07-18": (0.30, 1.20),
    "gpt-4o-2024-08-06": (3.75, 15.00),
    "gpt-4.1-2025-04-14": (3.00, 12.00),
    "gpt-4.1-mini-2025-04-14": (0.80, 3.20),
    "gpt-4.1-nano-2025-04-14": (0.20, 0.80),
}


@dataclass
class Estimate:
    requests: int
    input_tokens: int
    output_tokens: int
    output_basis: str                  # where the output size comes from
    price: tuple[float, float] | None  # USD per 1M tokens (input, output)

    @property
    def cost_usd(self) -> float | None:
        if self.price is None:
            return None
        return (self.input_tokens * self.price[0] + self.output_tokens * self.price[1]) / 1e6

    def __str__(self) -> str:
        text = (f"estimate: {self.requests} requests, ~{self.input_tokens} input and ~{self.output_tokens} output "
                f"tokens ({CHARS_PER_TOKEN} characters per token; output {self.output_basis})")
        if self.price is None:
            return text + "; cost unknown for this model (pass --price IN,OUT in USD per 1M tokens)"
        return text + f"; ~${self.cost_usd:.4f} at ${self.price[0]:g}/${self.price[1]:g} per 1M tokens"


@dataclass
class DistillReport:
    out: Path
    written: int                         # rows this run appended
    resumed: int                         # prompts already answered in ``out`` before this run
    estimate: Estimate
    rejected: list[dict[str, Any]] = field(default_factory=list)   # {"line", "reason"}; also in <out>.rejected.jsonl
    validation: "ValidationReport | None" = None


@dataclass(frozen=True)
class _Prompt:
    line: int
    messages: list[dict[str, Any]]
    reference: str            # the answer the file already holds ("" if none): sizes the output estimate

    @property
    def key(self) -> str:
        return prompt_key(self.messages)


def prompt_key(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_prompts(path: str | Path) -> list[_Prompt]:
    """Every row of a (valid) JSONL file as the messages to send."""
    from . import guess_kind, iter_rows, validate

    report = validate(path)
    if not report.valid:
        from .._exceptions import DataValidationError

        raise DataValidationError(report)
    out = []
    for line, row in iter_rows(path):
        kind = guess_kind(row)
        if kind is RowKind.PROMPT_RESPONSE:
            out.append(_Prompt(line, [{"role": "user", "content": row["prompt"]}], str(row.get("response", ""))))
        elif kind is RowKind.PREFERENCE:
            preferred = row["preferred_output"][0].get("content") or ""
            out.append(_Prompt(line, list(row["input"]["messages"]), str(preferred)))
        else:
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
            out.append(_Prompt(line, list(messages[:last]), str(messages[last].get("content") or "")))
    return out


def training_prompts(model: str, store: "Store | None" = None) -> Path:
    """The training file of the recorded job that produced ``model`` (e.g. an imported OpenAI fine-tune)."""
    from ..store import default_store

    store = store or default_store()
    for entry in store.list_adapters():
        if entry.location == model and entry.job_id:
            train = (store.get_job(entry.job_id).data or {}).get("train") or {}
            if train.get("path") and not train.get("missing"):
                return Path(train["path"])
            raise ConfigError(f"the training data of {model} (job {entry.job_id}) is not on this machine",
                              field="prompts", hint="pass --prompts FILE with the prompts to ask")
    raise ConfigError(f"no recorded job produced {model}, so there are no training prompts to reuse", field="prompts",
                      hint="import it first (`tunekit import openai FTJOB`) or pass --prompts FILE")


def estimate(prompts: list[_Prompt], model: str, *, max_tokens: int | None = None,
             price: tuple[float, float] | None = None) -> Estimate:
    def tokens(text: str) -> int:
        return -(-len(text) // CHARS_PER_TOKEN)

    input_tokens = sum(tokens(str(m.get("content") or "")) + 4 for p in prompts for m in p.messages)
    if any(p.reference for p in prompts):
        output = sum(tokens(p.reference) for p in prompts)
        basis = "sized like the answers in the prompt file"
        if max_tokens:
            output = min(output, max_tokens * len(prompts))
    else:
        output = (max_tokens or 0) * len(prompts)
        basis = "at most max_tokens per answer" if max_tokens else "unknown: the file holds no answers (0 counted)"
    if price is None:
        base = model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model
        price = FT_INFERENCE_PRICES.get(base)
    return Estimate(len(prompts), input_tokens, output, basis, price)


def distill(model: str, prompts: str | Path | None, out: str | Path, *, base_url: str | None = None,
            api_key: str | None = None, concurrency: int = 4, max_tokens: int | None = None,
            temperature: float | None = None, price: tuple[float, float] | None = None,
            retry_policy: RetryPolicy | None = None, estimate_only: bool = False,
            on_estimate: Callable[[Estimate], None] | None = None, client: Any = None) -> DistillReport:
    """Ask ``model`` every prompt of ``prompts`` (default: the training prompts of the job that made it) and
    append its answers to ``out`` as chat rows. ``on_estimate`` sees the estimate before the first call."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}", field="concurrency")
    out = Path(out)
    source = Path(prompts) if prompts is not None else training_prompts(model)
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out {out} is the prompt file; write the answers elsewhere", field="out")
    todo = read_prompts(source)
    done = _answered(out)
    resumed = sum(done.values())
    pending = []
    for p in todo:
        if done[p.key] > 0:
            done[p.key] -= 1
        else:
            pending.append(p)
    est = estimate(pending, model, max_tokens=max_tokens, price=price)
    if on_estimate is not None:
        on_estimate(est)
    report = DistillReport(out=out, written=0, resumed=resumed, estimate=est)
    if estimate_only:
        return report
    if pending:
        _run(report, pending, model, client or _client(base_url, api_key), concurrency=concurrency,
             max_tokens=max_tokens, temperature=temperature, policy=retry_policy or RetryPolicy.from_env())
    from . import validate

    report.validation = validate(out)
    return report


def _client(base_url: str | None, api_key: str | None) -> Any:
    try:
        import openai
    except ImportError as exc:
        from .._exceptions import MissingDependencyError

        raise MissingDependencyError("distill talks to the model through the openai client",
                                     hint="pip install 'tunekit[openai]'") from exc
    kwargs: dict[str, Any] = {"max_retries": 0}  # tunekit retries, once, under its policy
    if base_url:
        kwargs["base_url"] = base_url
    if api_key:
        kwargs["api_key"] = api_key
    try:
        return openai.OpenAI(**kwargs)
    except openai.OpenAIError as exc:
        from .._exceptions import AuthenticationError

        raise AuthenticationError(f"no API key for the chat endpoint: {exc}", provider="openai",
                                  hint="set OPENAI_API_KEY (or pass api_key=...)") from exc


def _answered(out: Path) -> Counter:
    """Prompt keys already answered in ``out``; a torn last line (a kill mid-write) is cut off first."""
    done: Counter = Counter()
    if not out.exists():
        return done
    with open(out, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    for lineno, raw in enumerate(data[:keep].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            messages = json.loads(raw)["messages"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{out}:{lineno}: not a row distill wrote ({exc})", field="out",
                              hint="give a new --out file, or remove the line") from exc
        done[prompt_key(messages[:-1])] += 1
    return done


def _run(report: DistillReport, pending: list[_Prompt], model: str, client: Any, *, concurrency: int,
         max_tokens: int | None, temperature: float | None, policy: RetryPolicy) -> None:
    from ..backends._managed import call_sdk
    from ._checks import check_row

    extra: dict[str, Any] = {}
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    if temperature is not None:
        extra["temperature"] = temperature

    def ask(prompt: _Prompt) -> Any:
        # "weight" marks which turns to train on; it is not part of a chat request
        sent = [{k: v for k, v in m.items() if k != "weight"} for m in prompt.messages]

        return call_sdk(client.chat.completions.create, model=model, messages=sent, provider="chat", policy=policy,
                        **extra)

    failure: BaseException | None = None
    report.out.parent.mkdir(parents=True, exist_ok=True)
    # At most `concurrency` prompts are asked and not yet written at any time (a window, not every prompt
    # submitted up front): a kill re-asks at most that many on resume, and a million prompts hold no million futures.
    todo = iter(pending)
    window: dict[Any, _Prompt] = {}
    with open(report.out, "a", encoding="utf-8") as f, ThreadPoolExecutor(concurrency) as pool:
        while True:
            while failure is None and len(window) < concurrency and (prompt := next(todo, None)) is not None:
                window[pool.submit(ask, prompt)] = prompt
            if not window:
                break
            future = next(iter(wait(window, return_when=FIRST_COMPLETED)[0]))
            prompt = window.pop(future)
            try:
                completion = future.result()
            except Exception as exc:  # stop asking; answers already in flight are still written
                failure = failure or exc
                continue
            row, reason = _row(prompt, completion)
            problems = check_row(row, RowKind.CHAT) if row is not None else []
            if row is None or problems:
                reason = reason or "; ".join(f"{field}: {message}" for field, _, message in problems)
                report.rejected.append({"line": prompt.line, "reason": reason})
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            report.written += 1
    if report.rejected:
        with open(report.out.with_name(report.out.name + ".rejected.jsonl"), "a", encoding="utf-8") as f:
            for item in report.rejected:
                f.write(json.dumps(item) + "\n")
    if failure is not None:
        if isinstance(failure, APIError):
            resume = (f"{report.written} answers were kept in {report.out}; the same command resumes without "
                      "asking them again")
            failure.hint = "; ".join(h for h in (failure.hint, resume) if h)
        raise failure


def _row(prompt: _Prompt, completion: Any) -> tuple[dict[str, Any] | None, str | None]:
    choice = completion.choices[0] if completion.choices else None
    if choice is None or not isinstance(choice.message.content, str) or not choice.message.content.strip():
        why = getattr(choice, "finish_reason", None) if choice else "no choices"
        return None, f"no text answer (finish_reason={why})"
    if choice.finish_reason == "length":
        return None, "answer cut at max_tokens (finish_reason=length): raise --max-tokens"
    return {"messages": [*prompt.messages, {"role": "assistant", "content": choice.message.content}]}, None

