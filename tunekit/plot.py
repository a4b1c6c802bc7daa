"""Loss curves of a job's stored metrics: a PNG (matplotlib, Agg) and a text chart for the terminal.

Both take the rows of ``Store.metrics(job_id)``: ``{"split": "train"|"eval", "step": int, "loss": ...}``
(an eval row may call its loss ``eval_loss``). Steps without a loss are skipped. The PNG also draws the
scores of answers generated during training (eval rows' ``exact_match``, ``contains``, ...: eval_generate),
on a 0-1 axis of their own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable


def loss_series(metrics: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, loss)]}, sorted by step, non-finite values dropped."""
    out: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for row in metrics:
        split = row.get("split", "train")
        value = row.get("eval_loss") if split == "eval" and row.get("eval_loss") is not None else row.get("loss")
        if value is None or split not in out:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[split].append((int(row["step"]), value))
    for series in out.values():
        series.sort()
    return out


def score_series(metrics: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, score)]} of the eval rows' generated-answer scores, sorted by step."""
    from .eval.metrics import TEXT_METRICS

    out: dict[str, list[tuple[int, float]]] = {}
    for row in metrics:
        if row.get("split") != "eval":
            continue
        for key, value in row.items():
            if key.partition(":")[0] in TEXT_METRICS and isinstance(value, (int, float)):
                out.setdefault(key, []).append((int(row["step"]), float(value)))
    return {k: sorted(v) for k, v in out.items()}


def plot_metrics(metrics: list[dict[str, Any]], png_path: str | Path, *, title: str | None = None) -> Path:
    """Write training (and validation) loss against step to ``png_path``; return the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in a worker or over SSH
    import matplotlib.pyplot as plt

    series = loss_series(metrics)
    if not series["train"] and not series["eval"]:
        raise ValueError("no loss values to plot (the job has not logged a step yet)")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    try:
        if series["train"]:
            xs, ys = zip(*series["train"])
            ax.plot(xs, ys, label="training loss", linewidth=1.2)
        if series["eval"]:
            xs, ys = zip(*series["eval"])
            ax.plot(xs, ys, "o-", label="validation loss", linewidth=1.2, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        scores = score_series(metrics)
        if scores:
            ax2 = ax.twinx()
            for i, (name, points) in enumerate(scores.items()):
                xs, ys = zip(*points)  # colours after the two loss curves'; markers apart where scores coincide
                ax2.plot(xs, ys, "--", marker="sdv^"[i % 4], color=f"C{2 + i}", label=f"{name} (generated)",
                         linewidth=1.0, markersize=5 - i % 4)
            ax2.set_ylim(-0.05, 1.05)
            ax2.set_ylabel("score of generated answers")
            more = ax2.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, loc="center right" if scores else "best")
        fig.tight_layout()
        fig.savefig(png_path)
    finally:
        plt.close(fig)
    return png_path


def terminal_plot(metrics: list[dict[str, Any]], width: int = 60, height: int = 15) -> str:
    """A text chart of loss vs step: ``*`` training, ``o`` validation (``@`` where both fall)."""
    series = loss_series(metrics)
    points = series["train"] + series["eval"]
    if not points:
        return "(no loss values logged yet)"
    width, height = max(width, 10), max(height, 3)
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    if v_hi == v_lo:
        v_lo, v_hi = v_lo - 0.5, v_hi + 0.5
    grid = [[" "] * width for _ in range(height)]

    def put(step: int, value: float, mark: str) -> None:
        x = 0 if s_hi == s_lo else round((step - s_lo) / (s_hi - s_lo) * (width - 1))
        y = round((v_hi - value) / (v_hi - v_lo) * (height - 1))
        cell = grid[y][x]
        grid[y][x] = mark if cell in (" ", mark) else "@"

    for step, value in series["train"]:
        put(step, value, "*")
    for step, value in series["eval"]:
        put(step, value, "o")

    labels = [f"{v_hi:.4g}", f"{(v_hi + v_lo) / 2:.4g}", f"{v_lo:.4g}"]
    pad = max(len(s) for s in labels)
    rows = []
    for i, line in enumerate(grid):
        label = labels[0] if i == 0 else labels[2] if i == height - 1 else labels[1] if i == height // 2 else ""
        rows.append(f"{label:>{pad}} |{''.join(line)}")
    rows.append(" " * pad + " +" + "-" * width)
    left, right = str(s_lo), str(s_hi)
    rows.append(" " * (pad + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    legend = "* training loss" + ("   o validation loss" if series["eval"] else "")
    rows.append(" " * (pad + 2) + f"step   {legend}")
    return "\n".join(rows)
