"""``tunekit.evaluate``: every target answers the held-out rows through the `openai` client, then is scored.

Order of work: validate the data; resolve the targets; held-out loss for local targets (transformers/PEFT);
start one embedded engine per local base (the base and its adapters decode in mixed batches); tell the
caller how many remote calls and tokens are coming; generate (bounded concurrency, the one retry policy,
answers cached for resume); score; judge; record the results in the adapter registry.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .._exceptions import ConfigError, DataValidationError
from .cache import AnswerCache, cache_dir, cache_key
from .metrics import TEXT_METRICS, check_metrics, scorer, wilson
from .targets import Target, resolve_target

DEFAULT_METRICS = ("loss", "exact_match", "contains")
CHARS_PER_TOKEN = 4  # the usual rough figure for English text, for estimates shown before paid calls


@dataclass
class Row:
    index: int
    line: int
    messages: list[dict[str, str]]  # the conversation up to the answer
    prompt: str | None  # prompt/response rows: the raw prompt (sent as a completion to local targets)
    reference: str


@dataclass
class TargetResult:
    target: str
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    judge: dict[str, Any] | None = None
    adapter_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "kind": self.kind, "metrics": dict(self.metrics),
                               "ci": {k: list(v) for k, v in self.ci.items()}}
        if self.judge is not None:
            out["judge"] = self.judge
        if self.adapter_id:
            out["adapter_id"] = self.adapter_id
        return out


@dataclass
class EvalResult:
    data: dict[str, Any]
    settings: dict[str, Any]
    targets: list[TargetResult]
    rows: list[dict[str, Any]]  # per row: line, prompt, reference, answers and scores by target
    judge: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "settings": self.settings, "judge": self.judge,
                "targets": [t.to_json() for t in self.targets]}

    def to_markdown(self) -> str:
        from .report import markdown

        return markdown(self)

    def to_html(self) -> str:
        from .report import html

        return html(self)

    def write(self, path: str | Path) -> Path:
        """Write the report: ``.html`` as one self-contained page, anything else as Markdown."""
        path = Path(path)
        path.write_text(self.to_html() if path.suffix.lower() in (".html", ".htm") else self.to_markdown(),
                        encoding="utf-8")
        return path


def load_rows(data: str | Path) -> tuple[list[Row], dict[str, Any]]:
    """Validate the held-out file (every problem with its line) and turn each row into a request + reference."""
    from ..data import iter_rows, validate

    report = validate(data)
    if not report.valid:
        raise DataValidationError(report)
    kind = report.kind.value if report.kind else None
    rows = []
    for i, (line, row) in enumerate(iter_rows(data)):
        if kind == "prompt_response":
            ref = row["response"] if "response" in row else row["completion"]
            rows.append(Row(i, line, [{"role": "user", "content": row["prompt"]}], row["prompt"], ref))
            continue
        msgs = row["messages"] if kind == "chat" else row["input"]["messages"] + row["preferred_output"]
        last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ConfigError(f"{data}:{line}: the conversation has no assistant turn to compare against",
                              field="data", hint="end each held-out conversation with the expected assistant answer")
        history = [{"role": m["role"], "content": _text(m.get("content"))} for m in msgs[:last]]
        rows.append(Row(i, line, history, None, _text(msgs[last].get("content"))))
    info = {"path": str(data), "sha256": report.sha256, "rows": len(rows), "kind": kind}
    return rows, info


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def evaluate(targets: Sequence[str] | str, data: str | Path, *, metrics: Sequence[str] = DEFAULT_METRICS,
             base_url: str | None = None, api_key: str | None = None, base_model: str | None = None,
             judge: str | None = None, judge_base_url: str | None = None, judge_api_key: str | None = None,
             baseline: str | None = None, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, concurrency: int = 8, resume: bool = True, record: bool = True,
             device: str | None = None, dtype: str | None = None,
             on_notice: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate each target on the held-out ``data`` and return the results (see docs/evaluation.md).

    ``targets``: job ids, registry adapters, adapter or model directories, base model ids, or ``URL#MODEL``
    (``base_url`` makes every plain name a model at that endpoint). ``judge``: a model at ``judge_base_url``
    that compares each target with ``baseline`` (default: the first target) on every row, both orders.
    """
    notice = on_notice or (lambda _msg: None)
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names:
        raise ConfigError("no target to evaluate", field="target", hint="name at least one TARGET")
    metrics = check_metrics(metrics)
    if concurrency < 1:
        raise ConfigError("concurrency must be at least 1", field="concurrency")
    if judge and not judge_base_url:
        raise ConfigError("--judge needs --judge-base-url (any OpenAI-compatible endpoint)", field="judge_base_url")
    rows, data_info = load_rows(data)
    resolved = [resolve_target(n, base_url=base_url, api_key=api_key, base_model=base_model) for n in names]
    if len({t.name for t in resolved}) != len(resolved):
        raise ConfigError("the same target is named twice", field="target")
    settings = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
    base_target = _baseline(resolved, baseline) if judge else None
    results = [TargetResult(t.name, t.kind, adapter_id=t.adapter_id) for t in resolved]

    if "loss" in metrics:
        from .loss import target_loss

        remote = [t.name for t in resolved if not t.local]
        if remote:
            notice(f"loss needs the weights: not computed for remote target(s) {', '.join(remote)}")
        for t, res in zip(resolved, results):
            if t.local:
                for key, (value, ci) in target_loss(t.base_model, t.adapter_path, data, device=device,
                                                    dtype=dtype).summary().items():
                    res.metrics[key], res.ci[key] = value, ci

    text_metrics = [m for m in metrics if m.partition(":")[0] in TEXT_METRICS]
    answers: dict[str, list[str]] = {}
    if text_metrics or judge:
        caches, jobs = _plan_generation(resolved, rows, settings, data_info["sha256"], resume)
        _announce(jobs, rows, max_tokens, judge, judge_base_url, len(resolved), notice)
        pending = [t for t in resolved if any(t is jt for jt, _ in jobs)]  # only these are loaded or called
        with _served(pending, device=device, dtype=dtype, max_batch_size=max(concurrency, 1)) as clients:
            _generate(jobs, caches, clients, settings, concurrency)
        answers = {t.name: [caches[t.name][0].get(str(r.index))["answer"] for r in rows] for t in resolved}

    row_out = [{"index": r.index, "line": r.line, "prompt": r.prompt if r.prompt is not None else r.messages,
                "reference": r.reference, "answers": {t.name: answers[t.name][r.index] for t in resolved}
                if answers else {}, "scores": {t.name: {} for t in resolved}} for r in rows]
    for m in text_metrics:
        score = scorer(m)
        for t, res in zip(resolved, results):
            hits = [score(a, r.reference) for a, r in zip(answers[t.name], rows)]
            for out, hit in zip(row_out, hits):
                out["scores"][t.name][m] = hit
            res.metrics[m] = sum(hits) / len(hits)
            res.ci[m] = wilson(sum(hits), len(hits))

    judge_info = None
    if judge:
        from .judge import run_judge

        judge_info = {"model": judge, "base_url": judge_base_url, "baseline": base_target.name,
                      "position_swapped": True}
        run_judge(judge, judge_base_url, judge_api_key, resolved, base_target, rows, answers, results, row_out,
                  data_info["sha256"], concurrency, resume)

    result = EvalResult(data_info, settings, results, row_out, judge_info)
    if record:
        from .record import record_results

        record_results(result)
    return result


def _baseline(resolved: list[Target], baseline: str | None) -> Target:
    if baseline is None:
        if len(resolved) < 2:
            raise ConfigError("the judge compares targets with a baseline, but only one target was given",
                              field="baseline", hint="add the base model as a TARGET (or --baseline NAME)")
        return resolved[0]
    for t in resolved:
        if t.name == baseline:
            return t
    raise ConfigError(f"baseline {baseline!r} is not one of the targets", field="baseline",
                      hint="name the baseline as a TARGET too")


def _announce(jobs: list[tuple[Target, Row]], rows: list[Row], max_tokens: int, judge: str | None,
              judge_base_url: str | None, n_targets: int, notice: Callable[[str], None]) -> None:
    """Say how many remote calls and tokens are coming before the first one is made."""
    def tokens(r: Row) -> int:
        return len(str(r.messages)) // CHARS_PER_TOKEN

    remote = [(t, r) for t, r in jobs if not t.local]
    if remote:
        n = len({id(t) for t, _ in remote})
        notice(f"{len(remote)} generation call(s) to {n} remote target(s), about "
               f"{sum(tokens(r) + max_tokens for _, r in remote)} tokens")
    if judge:
        pairs = n_targets - 1
        calls = 2 * pairs * len(rows)
        per_row = sum(150 + tokens(r) + len(r.reference) // CHARS_PER_TOKEN + 2 * max_tokens for r in rows)
        notice(f"{calls} judge call(s) to {judge} at {judge_base_url} ({pairs} pair(s) x {len(rows)} rows x 2 "
               f"orders), at most about {2 * pairs * per_row} tokens (cached verdicts are not asked again)")


@contextlib.contextmanager
def _served(resolved: list[Target], **engine_kw: Any) -> Iterator[dict[str, Any]]:
    """An `openai` client per target: local ones through one in-process embedded engine per base."""
    from openai import OpenAI

    clients: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        groups: dict[str, list[Target]] = {}
        for t in resolved:
            if t.local:
                groups.setdefault(str(t.base_model), []).append(t)
            else:
                clients[t.name] = OpenAI(base_url=t.base_url, api_key=t.api_key or "unused", max_retries=0)
        for base, group in groups.items():
            from ..serve.embedded import start_in_thread

            adapters = {f"adapter-{i}": str(t.adapter_path) for i, t in enumerate(group) if t.adapter_path}
            server = stack.enter_context(start_in_thread(
                base, adapters, max_loras=max(len(adapters), 1), batch_window_ms=2.0, **engine_kw))
            client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            for i, t in enumerate(group):
                t.model = f"adapter-{i}" if t.adapter_path else base
                clients[t.name] = client
        yield clients


def _plan_generation(resolved: list[Target], rows: list[Row], settings: dict[str, Any], data_sha256: str,
                     resume: bool) -> tuple[dict[str, tuple[AnswerCache, str]], list[tuple[Target, Row]]]:
    """Each target's answer cache and API, and the (target, row) calls not answered by an earlier run."""
    caches, jobs = {}, []
    for t in resolved:
        api = "completions" if t.local and rows and rows[0].prompt is not None else "chat"
        path = cache_dir(data_sha256) / f"answers-{cache_key(t.identity(), settings, api)}.jsonl"
        if not resume and path.exists():
            path.unlink()
        caches[t.name] = (AnswerCache(path), api)
        jobs += [(t, r) for r in rows if caches[t.name][0].get(str(r.index)) is None]
    return caches, jobs


def _generate(jobs: list[tuple[Target, Row]], caches: dict[str, tuple[AnswerCache, str]], clients: dict[str, Any],
              settings: dict[str, Any], concurrency: int) -> None:
    from ..backends._managed import call_sdk

    def call(t: Target, r: Row) -> None:
        cache, api = caches[t.name]
        client = clients[t.name]
        kw = {"model": t.model, "max_tokens": settings["max_tokens"], "temperature": settings["temperature"],
              "top_p": settings["top_p"]}
        if settings["seed"] is not None:
            kw["seed"] = settings["seed"]

        def once() -> str:
            if api == "completions":
                return client.completions.create(prompt=r.prompt, **kw).choices[0].text or ""
            return client.chat.completions.create(messages=r.messages, **kw).choices[0].message.content or ""

        cache.put(str(r.index), {"answer": call_sdk(once, provider=t.provider), "at": time.time()})

    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        for fut in [pool.submit(call, t, r) for t, r in jobs]:
            fut.result()
    finally:  # on a failure, calls not yet started are dropped; finished ones are cached for the next run
        pool.shutdown(wait=True, cancel_futures=True)


