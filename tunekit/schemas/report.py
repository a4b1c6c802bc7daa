"""ValidationReport: what ``tunekit.validate`` found in a data file, and the rules it checked against."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from tunekit.schemas.rows import RowKind


class DataRules(BaseModel):
    """What a backend accepts. Each backend supplies its own; the default accepts any kind."""

    model_config = ConfigDict(extra="forbid")

    backend: Optional[str] = Field(None, description="The backend these rules come from (shown in messages).")
    min_rows: int = Field(1, ge=0, description="Fewest valid rows the backend accepts.")
    kinds: Optional[set[RowKind]] = Field(None, description="Row kinds the backend accepts; None = all.")
    max_bytes: Optional[int] = Field(None, ge=1, description="Largest file the backend accepts, in bytes.")
    note: Optional[str] = Field(None, description="Shown with a rule's problem, e.g. 'OpenAI needs at least 10 examples'.")
    max_tokens: Optional[int] = Field(
        None, ge=1, description="Tokens per example the backend trains on (the spec's max_length); rows far "
                                "longer (tunekit.data.validator.BYTES_PER_TOKEN bytes per token) are refused.")
    kind_hints: dict[RowKind, str] = Field(
        default_factory=dict, description="Next step shown when a file of this row kind is refused, e.g. set method='dpo'.")


class Problem(BaseModel):
    """One problem. ``line`` is 1-based; None for a problem with the whole file (empty, too large, too few rows)."""

    line: Optional[int] = None
    field: Optional[str] = Field(None, description="Dotted path inside the row, e.g. 'messages[2].role'.")
    code: str = Field(..., description="Short machine id, e.g. 'invalid_json', 'duplicate_row'.")
    message: str = Field(..., description="What is wrong and, when useful, what to do.")


class LengthStats(BaseModel):
    """Length of each valid row's text. ``unit`` says whether these are tokens or characters.

    Percentiles are exact: they come from a histogram of lengths (one counter per distinct length),
    not from a sample.
    """

    unit: Literal["tokens", "characters"]
    count: int = 0
    min: Optional[int] = None
    max: Optional[int] = None
    mean: Optional[float] = None
    p50: Optional[int] = None
    p95: Optional[int] = None


class ValidationReport(BaseModel):
    path: str
    valid: bool
    kind: Optional[RowKind] = Field(None, description="Row kind of the file (decided by its first valid row).")
    rows: int = Field(0, description="Valid rows.")
    lines: int = Field(0, description="Lines read (blank and invalid ones included).")
    sha256: str
    size_bytes: int
    problems: list[Problem] = Field(default_factory=list, description="The first max_problems problems.")
    problem_count: int = Field(0, description="Every problem found, shown or not.")
    problem_counts: dict[str, int] = Field(default_factory=dict, description="Problem code -> how many (all).")
    length: LengthStats
    backend: Optional[str] = None

    @property
    def truncated(self) -> bool:
        """True when more problems were found than are listed."""
        return self.problem_count > len(self.problems)

    def format_lines(self) -> list[str]:
        """One ``PATH:LINE: message`` string per listed problem (``PATH: message`` for whole-file ones)."""
        out = []
        for p in self.problems:
            where = f"{self.path}:{p.line}" if p.line is not None else self.path
            field = f" [{p.field}]" if p.field else ""
            out.append(f"{where}: {p.message}{field} ({p.code})")
        if self.truncated:
            out.append(f"{self.path}: ... and {self.problem_count - len(self.problems)} more problem(s) not listed")
        return out

    def summary(self) -> str:
        """One line: valid or not, kind, rows, lengths."""
        state = "valid" if self.valid else f"INVALID ({self.problem_count} problem(s))"
        kind = self.kind.value if self.kind else "unknown kind"
        ln = self.length
        lengths = (
            f"; {ln.unit} per row: min {ln.min}, p50 {ln.p50}, p95 {ln.p95}, max {ln.max}, mean {ln.mean:.1f}"
            if ln.count
            else ""
        )
        return f"{self.path}: {state}: {self.rows} {kind} row(s) in {self.lines} line(s){lengths}"

    def raise_for_problems(self) -> "ValidationReport":
        """Raise ``DataValidationError`` when invalid; return self otherwise (for chaining)."""
        if not self.valid:
            from tunekit._exceptions import DataValidationError

            raise DataValidationError(self)
        return self


__all__ = ["DataRules", "LengthStats", "Problem", "ValidationReport"]
