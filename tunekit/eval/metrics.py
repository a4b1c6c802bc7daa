"""Per-row scores and their 95% confidence intervals.

    exact_match   answer == reference, after stripping surrounding whitespace
    contains      the reference occurs in the answer
    regex         the (stripped) reference, read as a regular expression, matches the whole stripped answer;
                  ``regex:PATTERN`` matches PATTERN anywhere in the answer instead
    json_valid    the answer parses as JSON

Proportions get a Wilson score interval (right at 0 and 1, where the normal one collapses); means of
anything else (loss, the judge's win rate) a percentile bootstrap over rows with a fixed seed, so a
report is reproducible.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Callable, Sequence

from .._exceptions import ConfigError

Z95 = 1.959963984540054
TEXT_METRICS = ("exact_match", "contains", "regex", "json_valid")
ALL_METRICS = ("loss", *TEXT_METRICS)
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})  # for every other metric higher is better


def _regex(pattern: str | None) -> Callable[[str, str], bool]:
    if pattern is None:
        return lambda answer, ref: _fullmatch(ref.strip(), answer.strip())
    compiled = re.compile(pattern)
    return lambda answer, _ref: compiled.search(answer) is not None


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error:  # a reference that is not a valid pattern matches only itself
        return text == pattern


def _json_valid(answer: str, _ref: str) -> bool:
    try:
        json.loads(answer)
    except ValueError:
        return False
    return True


def scorer(metric: str) -> Callable[[str, str], bool]:
    """The ``(answer, reference) -> bool`` function of a text metric name."""
    name, _, arg = metric.partition(":")
    if name == "exact_match":
        return lambda answer, ref: answer.strip() == ref.strip()
    if name == "contains":
        return lambda answer, ref: ref.strip() in answer
    if name == "regex":
        if arg:
            try:
                re.compile(arg)
            except re.error as exc:
                raise ConfigError(f"metric {metric!r}: not a valid regular expression: {exc}", field="metric") from None
        return _regex(arg or None)
    if name == "json_valid":
        return _json_valid
    raise ConfigError(f"unknown metric {metric!r}", field="metric",
                      hint=f"use one of: {', '.join(ALL_METRICS)} (or regex:PATTERN)")


def check_metrics(metrics: Sequence[str]) -> list[str]:
    out = []
    for m in metrics:
        if m != "loss":
            scorer(m)  # raises on an unknown name or a bad pattern
        if m not in out:
            out.append(m)
    if not out:
        raise ConfigError("no metric asked for", field="metric", hint=f"use one of: {', '.join(ALL_METRICS)}")
    return out


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may be fractional, e.g. half-counted ties)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], *, resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of sum(num)/sum(den), resampling rows (den=1s gives a mean)."""
    n = len(num)
    if n == 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        d = sum(den[i] for i in idx)
        if d:
            stats.append(sum(num[i] for i in idx) / d)
    stats.sort()
    return (stats[int(0.025 * (len(stats) - 1))], stats[int(0.975 * (len(stats) - 1))])
