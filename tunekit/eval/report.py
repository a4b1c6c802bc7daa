"""The report: a per-metric table with 95% intervals, then the rows where the targets disagree most.

Markdown for terminals and pull requests; HTML as one self-contained file (inline CSS, no scripts,
no external assets) that opens anywhere. ``result`` is an ``EvalResult`` (eval/result.py, which
calls these renderers; nothing here imports it back).
"""

from __future__ import annotations

import html as _html
from typing import Any

from .metrics import LOWER_IS_BETTER

ORDER = ("loss", "perplexity", "exact_match", "contains", "json_valid", "judge_win_rate")


def metric_names(result: Any) -> list[str]:
    seen: list[str] = []
    for t in result.targets:
        seen += [m for m in t.metrics if m not in seen]
    return sorted(seen, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def cell(result: Any, target: Any, metric: str) -> str:
    if metric not in target.metrics:
        return "—"
    v, (lo, hi) = target.metrics[metric], target.ci.get(metric, (None, None))
    fmt = (lambda x: f"{x:.3f}") if metric in ("loss", "perplexity") else (lambda x: f"{x:.2f}")
    text = fmt(v) + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None else "")
    if metric == "judge_win_rate" and target.judge:
        j = target.judge
        text += f" ({j['wins']}W/{j['ties']}T/{j['losses']}L)"
    return text


def disagreements(result: Any, limit: int = 5) -> list[dict[str, Any]]:
    """Rows whose scores differ most across targets (then those with the most distinct answers)."""
    def spread(row: dict[str, Any]) -> tuple[int, int]:
        per_metric: dict[str, set] = {}
        for scores in row["scores"].values():
            for m, v in scores.items():
                per_metric.setdefault(m, set()).add(v)
        return (sum(len(v) > 1 for v in per_metric.values()), len(set(row["answers"].values())))

    ranked = sorted((r for r in result.rows if r["answers"]), key=spread, reverse=True)
    return [r for r in ranked[:limit] if spread(r) != (0, 1)]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def _settings_line(result: Any) -> str:
    s = result.settings
    line = f"temperature {s['temperature']}, top_p {s['top_p']}, max_tokens {s['max_tokens']}, seed {s['seed']}"
    if result.judge:
        line += f"; judge {result.judge['model']} vs baseline {result.judge['baseline']} (both orders)"
    return line


def markdown(result: Any) -> str:
    d = result.data
    metrics = metric_names(result)
    lines = [f"# Evaluation of {len(result.targets)} target(s) on {d['path']}", "",
             f"{d['rows']} {d['kind']} rows, sha256 `{d['sha256'][:12]}`; {_settings_line(result)}. "
             "Intervals are 95%.", "",
             "| target | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for t in result.targets:
        lines.append(f"| {_md(t.target)} | " + " | ".join(cell(result, t, m) for m in metrics) + " |")
    rows = disagreements(result)
    if rows:
        lines += ["", "## Rows where the targets disagree most", ""]
        for r in rows:
            lines += [f"### line {r['line']}", "", f"**prompt:** {_md(_prompt_text(r['prompt']))}  ",
                      f"**reference:** {_md(r['reference'])}", "", "| target | answer | scores |", "|---|---|---|"]
            for name, answer in r["answers"].items():
                lines.append(f"| {_md(name)} | {_md(answer)} | {_md(_scores(r['scores'][name]))} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _scores(scores: dict[str, Any]) -> str:
    return ", ".join(f"{m} {'yes' if v is True else 'no' if v is False else v}" for m, v in scores.items())


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ") or "∅"


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.best{background:#e3f5e1;font-weight:600}pre{white-space:pre-wrap;margin:0;font:13px ui-monospace,monospace}
.muted{color:#666}"""


def html(result: Any) -> str:
    e = _html.escape
    d = result.data
    metrics = metric_names(result)
    best = {m: _best(result, m) for m in metrics}
    head = "".join(f"<th>{e(m)}</th>" for m in metrics)
    body = ""
    for t in result.targets:
        cells = "".join(f"<td class=\"{'best' if best[m] is t else ''}\">{e(cell(result, t, m))}</td>"
                        for m in metrics)
        body += f"<tr><th>{e(t.target)}</th>{cells}</tr>"
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>tunekit eval: {e(d['path'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Evaluation of {len(result.targets)} target(s) on {e(d['path'])}</h1>",
             f"<p class=\"muted\">{d['rows']} {e(str(d['kind']))} rows, sha256 <code>{e(d['sha256'][:12])}</code>; "
             f"{e(_settings_line(result))}. Intervals are 95%.</p>",
             f"<table id=\"metrics\"><tr><th>target</th>{head}</tr>{body}</table>"]
    rows = disagreements(result)
    if rows:
        parts.append("<h2>Rows where the targets disagree most</h2>")
        for r in rows:
            cols = "".join(f"<th>{e(n)}</th>" for n in r["answers"])
            answers = "".join(f"<td><pre>{e(a)}</pre><p class=\"muted\">{e(_scores(r['scores'][n]))}</p></td>"
                              for n, a in r["answers"].items())
            parts.append(f"<h3>line {r['line']}</h3><table class=\"row\"><tr><th>prompt</th><th>reference</th>{cols}"
                         f"</tr><tr><td><pre>{e(_prompt_text(r['prompt']))}</pre></td><td><pre>{e(r['reference'])}"
                         f"</pre></td>{answers}</tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _best(result: Any, metric: str) -> Any:
    have = [t for t in result.targets if metric in t.metrics]
    if len(have) < 2:
        return None
    key = (lambda t: t.metrics[metric]) if metric in LOWER_IS_BETTER else (lambda t: -t.metrics[metric])
    return min(have, key=key)
