"""The values an evaluation produces: one ``TargetResult`` per target, gathered in an ``EvalResult``.

Lowest layer of the eval package (run, record and report read these; this module reads only report's
renderers), so the package has no import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report


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
        return report.markdown(self)

    def to_html(self) -> str:
        return report.html(self)

    def write(self, path: str | Path) -> Path:
        """Write the report: ``.html`` as one self-contained page, anything else as Markdown."""
        path = Path(path)
        path.write_text(self.to_html() if path.suffix.lower() in (".html", ".htm") else self.to_markdown(),
                        encoding="utf-8")
        return path
