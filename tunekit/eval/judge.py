"""Pairwise LLM judge: any OpenAI-compatible model says which of two answers is better.

Each (target, baseline) pair is asked twice per row, once in each order, to cancel position bias. A row
is a win when the target is preferred more often than the baseline over the two orders, a loss when
less often, a tie otherwise (an unreadable verdict counts as a tie and is counted). The win rate is
(wins + ties/2) / rows, with a bootstrap interval over rows.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .cache import AnswerCache, cache_dir, cache_key
from .metrics import bootstrap_ratio

SYSTEM = ("You are a strict judge. You are shown a conversation, a reference answer and two candidate answers, "
          "A and B. Decide which candidate answers the last user turn better (correctness first, matching the "
          "reference, then helpfulness). Reply with exactly one word: A, B or TIE.")


def judge_prompt(messages: list[dict[str, str]], reference: str, a: str, b: str) -> str:
    convo = "\n".join(f"[{m['role']}] {m['content']}" for m in messages)
    return (f"## Conversation\n{convo}\n\n## Reference answer\n{reference}\n\n## Answer A\n{a}\n\n"
            f"## Answer B\n{b}\n\n## Verdict (A, B or TIE)")


def parse_verdict(text: str) -> str | None:
    m = re.match(r"\W*(A|B|TIE)\b", (text or "").strip().upper())
    return m.group(1) if m else None


def run_judge(model: str, base_url: str, api_key: str | None, targets: list, baseline: Any, rows: list,
              answers: dict[str, list[str]], results: list, row_out: list[dict[str, Any]], data_sha256: str,
              concurrency: int, resume: bool) -> None:
    """Fill ``results[i].judge`` and ``metrics['judge_win_rate']`` for every target but the baseline."""
    from openai import OpenAI

    from ..backends._managed import call_sdk

    client = OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0)
    path = cache_dir(data_sha256) / f"judge-{cache_key(model, base_url)}.jsonl"
    if not resume and path.exists():
        path.unlink()
    cache = AnswerCache(path)

    def ask(row: Any, a: str, b: str) -> str | None:
        key = cache_key(row.messages, row.reference, a, b)
        hit = cache.get(key)
        if hit is None:
            def once() -> str:
                r = client.chat.completions.create(
                    model=model, temperature=0, max_tokens=8,
                    messages=[{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": judge_prompt(row.messages, row.reference, a, b)}])
                return r.choices[0].message.content or ""

            cache.put(key, {"verdict": call_sdk(once, provider="judge")})
            hit = cache.get(key)
        return parse_verdict(hit["verdict"])

    base_answers = answers[baseline.name]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for t, res in zip(targets, results):
            if t is baseline:
                continue
            mine = answers[t.name]
            first = [pool.submit(ask, r, mine[r.index], base_answers[r.index]) for r in rows]  # target is A
            second = [pool.submit(ask, r, base_answers[r.index], mine[r.index]) for r in rows]  # target is B
            wins = ties = losses = unreadable = 0
            values = []
            for r, f1, f2 in zip(rows, first, second):
                v1, v2 = f1.result(), f2.result()
                unreadable += (v1 is None) + (v2 is None)
                score = {"A": 1, "B": -1}.get(v1 or "", 0) + {"B": 1, "A": -1}.get(v2 or "", 0)
                outcome = "win" if score > 0 else "loss" if score < 0 else "tie"
                wins, ties, losses = wins + (outcome == "win"), ties + (outcome == "tie"), losses + (outcome == "loss")
                values.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome])
                row_out[r.index]["scores"][t.name]["judge"] = outcome
            n = len(rows)
            res.judge = {"baseline": baseline.name, "wins": wins, "ties": ties, "losses": losses,
                         "unreadable_verdicts": unreadable, "calls": 2 * n}
            res.metrics["judge_win_rate"] = sum(values) / n if n else float("nan")
            res.ci["judge_win_rate"] = bootstrap_ratio(values, [1.0] * n)
