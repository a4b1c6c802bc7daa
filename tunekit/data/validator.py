"""Streaming JSONL validator: every problem with its line, in constant memory.

The file is read in 1 MiB binary blocks split on b"\\n" (the whole file is never held); each line
is decoded as strict UTF-8 and parsed with the stdlib ``json``. Rows of the usual shape take a fast
path of plain type checks; anything else goes through ``_checks`` for a precise message. Memory that grows with the file, and why it is acceptable:

* duplicates: a set of 16-byte BLAKE2b digests of the valid rows' bytes (~90 bytes per row in
  CPython, so ~90 MB for a million rows). The line of a duplicate's first occurrence is found by a
  second pass, run only when duplicates were listed.
* lengths: a histogram (one counter per distinct length), so p50/p95 are exact at O(max length).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from tunekit._exceptions import ConfigError
from tunekit.data import _checks
from tunekit.data._checks import Issue
from tunekit.schemas.report import DataRules, LengthStats, Problem, ValidationReport
from tunekit.schemas.rows import RowKind

BLOCK = 1 << 20
# A row longer than this many bytes per token of the run's max_length cannot fit it by a wide margin:
# English averages ~4 bytes per token, and even JSON-escaped CJK or emoji (\\uNNNN, 6-12 bytes per
# token) and long whitespace tokens stay well under it. Such a row would be cut to a sliver of itself,
# and tokenizing it whole costs the worker gigabytes, so it is refused before training.
BYTES_PER_TOKEN = 64
BOM = b"\xef\xbb\xbf"
_PR = RowKind.PROMPT_RESPONSE
FAST_PATH = True  # tests turn it off to check that the fast path agrees with the careful one


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use null or a string)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _DECODER.decode
# The C scanner behind decode(), minus its whitespace handling: the fast path uses it when the whole
# line is one JSON value with no surrounding whitespace; any other line takes the careful path.
_scan_once = _DECODER.scan_once


class _Scan:
    """State of one pass over a file."""

    def __init__(self, path: str, rules: DataRules, tokenizer: Any, max_problems: int) -> None:
        self.path = path
        self.rules = rules
        self.tokenizer = tokenizer
        self.max_problems = max_problems
        self.problems: list[tuple[Optional[int], Optional[str], str, str]] = []
        self.counts: dict[str, int] = {}
        self.kind: Optional[RowKind] = None
        self.kind_line: Optional[int] = None
        self.rows = 0
        self.lines = 0
        self.seen: set[bytes] = set()
        self.dup_digests: dict[int, bytes] = {}  # line -> digest, for listed duplicates only
        self.hist: dict[int, int] = {}
        self.max_row = rules.max_tokens * BYTES_PER_TOKEN if rules.max_tokens else 0  # 0: no limit

    def add(self, line: Optional[int], field: Optional[str], code: str, message: str) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        if len(self.problems) < self.max_problems:
            self.problems.append((line, field, code, message))

    # -- the hot loop -------------------------------------------------------------------------

    def run(self, f, sha) -> None:
        carry = b""
        lineno = 0
        limit = self.max_row
        overlong = 0  # bytes so far of a line over the limit, skipped without being held
        seen, hist, scan, blake2b = self.seen, self.hist, _scan_once, hashlib.blake2b
        surrogate = _checks.SURROGATE_ESCAPE.search
        fast = self.tokenizer is None and FAST_PATH
        fast_kind: Optional[RowKind] = None
        fast_other = None
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            sha.update(block)
            if overlong:
                nl = block.find(b"\n")
                if nl < 0:
                    overlong += len(block)
                    continue
                lineno += 1
                self.too_long(lineno, overlong + nl)
                overlong = 0
                block = block[nl + 1:]
            if carry:
                block = carry + block
            lines = block.split(b"\n")
            carry = lines.pop()
            if limit and len(carry) > limit:
                overlong, carry = len(carry), b""
            if lineno == 0 and lines and lines[0].startswith(BOM):
                self.add(1, None, "bom", "file starts with a UTF-8 byte-order mark (BOM): save it as UTF-8 without BOM")
                lines[0] = lines[0][3:]
            for raw in lines:
                lineno += 1
                if limit and len(raw) > limit:
                    self.too_long(lineno, len(raw))
                    continue
                # Fast path once the kind is known: a well-formed row of the usual shape is valid with
                # plain type checks; any other line takes the careful path, which explains it.
                if fast_kind is not None:
                    try:
                        text = raw.decode()
                        obj, end = scan(text, 0)
                        if end != len(text):
                            obj = None
                    except (ValueError, StopIteration, RecursionError):
                        obj = None
                    n = None
                    if type(obj) is dict:
                        if fast_kind is _PR:
                            if len(obj) == 2:
                                p = obj.get("prompt")
                                r = obj.get("response")
                                if r is None:
                                    r = obj.get("completion")
                                if (type(p) is str and type(r) is str and p and r
                                        and not p.isspace() and not r.isspace()):
                                    n = len(p) + len(r)
                        else:
                            n = fast_other(obj)
                    if n is not None and b"\\u" in raw and surrogate(raw):
                        n = None  # the careful path checks the escape
                    if n is not None:
                        digest = blake2b(raw, digest_size=16).digest()
                        if digest in seen:
                            self.duplicate(lineno, digest)
                            continue
                        seen.add(digest)
                        hist[n] = hist.get(n, 0) + 1
                        self.rows += 1
                        continue
                self.line(lineno, raw, last=False)
                if fast_kind is None and fast and self.kind is not None:
                    fast_kind, fast_other = self.kind, _checks.FAST_CHECKS.get(self.kind)
        if overlong:
            lineno += 1
            self.too_long(lineno, overlong)
        elif carry:
            lineno += 1
            if lineno == 1 and carry.startswith(BOM):
                self.add(1, None, "bom", "file starts with a UTF-8 byte-order mark (BOM): save it as UTF-8 without BOM")
                carry = carry[3:]
            self.line(lineno, carry, last=True)
        self.lines = lineno

    # -- the careful path ---------------------------------------------------------------------

    def line(self, lineno: int, raw: bytes, *, last: bool) -> None:
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            hint = " (it looks like UTF-16)" if b"\x00" in raw else ""
            self.add(lineno, None, "not_utf8",
                     f"not valid UTF-8{hint}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}; "
                     "re-save the file as UTF-8")
            return
        if not text.strip():
            self.add(lineno, None, "blank_line", "blank line: remove it (every line must be one JSON object)")
            return
        try:
            obj = _decode(text)
        except ValueError as exc:
            if last:
                self.add(lineno, None, "truncated_line",
                         f"last line is cut off (no newline at the end and not valid JSON: {_short(exc)}); "
                         "the file may be incomplete: re-export it")
            else:
                self.add(lineno, None, "invalid_json", f"invalid JSON: {_short(exc)}")
            return
        except RecursionError:
            self.add(lineno, None, "invalid_json", "invalid JSON: nested too deeply")
            return
        if type(obj) is not dict:
            self.add(lineno, None, "not_object",
                     f"line is a JSON {_checks.json_type(obj)}, not an object: each line must be one row object")
            return
        if b"\\u" in raw and _checks.SURROGATE_ESCAPE.search(raw):
            issue = _checks.lone_surrogate(obj)
            if issue is not None:
                self.add(lineno, *issue)
                return
        guess = _checks.guess_kind(obj)
        if guess is None:
            self.add(lineno, *_checks.unknown_kind_issue(obj))
            return
        if self.kind is not None and guess is not self.kind:
            self.add(lineno, None, "mixed_kinds",
                     f"a {guess.value} row in a {self.kind.value} file (kind set by line {self.kind_line}): "
                     "use one row kind per file")
            return
        try:
            issues: list[Issue] = _checks.check_row(obj, guess)
        except RecursionError:
            issues = [(None, "invalid_json", "row is nested too deeply")]
        if issues:
            for field, code, message in issues:
                self.add(lineno, field, code, message)
            return
        if self.kind is None:
            self.kind, self.kind_line = guess, lineno
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in self.seen:
            self.duplicate(lineno, digest)
            return
        try:
            n = self.measure(obj, guess)
        except Exception as exc:  # a tokenizer failing on odd text is a data problem, not a crash
            self.add(lineno, None, "tokenize_failed", f"the tokenizer failed on this row: {_short(exc)}")
            return
        self.seen.add(digest)
        self.hist[n] = self.hist.get(n, 0) + 1
        self.rows += 1

    def too_long(self, lineno: int, size: int) -> None:
        tokens = self.rules.max_tokens
        self.add(lineno, None, "row_too_long",
                 f"row is {size:,} bytes, far more than max_length={tokens:,} tokens can hold (over "
                 f"{BYTES_PER_TOKEN} bytes per token: {self.max_row:,} bytes): it would be cut to a small part "
                 "of itself; split or shorten it, or raise hyperparameters.max_length")

    def duplicate(self, lineno: int, digest: bytes) -> None:
        if len(self.problems) < self.max_problems:
            self.dup_digests[lineno] = digest
        self.add(lineno, None, "duplicate_row", "duplicate row")  # message completed by _first_lines

    def measure(self, obj: dict, kind: RowKind) -> int:
        if self.tokenizer is None:
            return _checks.text_chars(obj, kind)
        return token_length(self.tokenizer, obj, kind)

    # -- after the pass -----------------------------------------------------------------------

    def finish(self) -> None:
        rules = self.rules
        who = rules.backend or "training"
        note = f" ({rules.note})" if rules.note else ""
        if self.kind is not None and rules.kinds is not None and self.kind not in rules.kinds:
            accepted = ", ".join(sorted(k.value for k in rules.kinds))
            backend = rules.backend or "this backend"
            if self.kind in rules.kind_hints:  # the backend takes these rows with another spec
                message = (f"{backend} does not train on {self.kind.value} rows with this spec (accepts: {accepted}): "
                           f"{rules.kind_hints[self.kind]}")
            else:
                convert = ""
                if self.kind is not RowKind.CHAT and RowKind.CHAT in rules.kinds:
                    convert = "; convert with tunekit.data.convert_file(src, dst, 'chat')"
                message = f"{backend} does not accept {self.kind.value} rows (accepts: {accepted}){convert}"
            self.add(self.kind_line, None, "kind_not_accepted", message + note)
        if self.lines and self.rows < rules.min_rows:
            self.add(None, None, "too_few_rows",
                     f"{self.rows} valid row(s); {who} needs at least {rules.min_rows}{note}")


def _short(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):  # its own "line 1" would be confusing: we name the file's line
        msg = f"{exc.msg} at column {exc.colno}"
    else:
        msg = str(exc)
    return msg if len(msg) <= 120 else msg[:117] + "..."


def token_length(tokenizer: Any, obj: dict, kind: RowKind) -> int:
    """Tokens of a valid row: the chat template for messages, plain tokenization for prompt/response."""
    if kind is RowKind.PROMPT_RESPONSE:
        answer = obj["response"] if "response" in obj else obj["completion"]
        return len(tokenizer(obj["prompt"] + answer)["input_ids"])

    def chat_tokens(messages: list) -> int:
        msgs = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(msgs, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return len(ids)
        return sum(len(tokenizer(m["content"])["input_ids"]) for m in msgs)

    if kind is RowKind.CHAT:
        return chat_tokens(obj["messages"])
    inp = obj["input"]["messages"]
    return max(chat_tokens(inp + obj["preferred_output"]), chat_tokens(inp + obj["non_preferred_output"]))


def _first_lines(path: Path, wanted: set[bytes]) -> dict[bytes, int]:
    """Second pass: the first line holding each wanted digest."""
    found: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[3:]
            d = hashlib.blake2b(raw[:-1] if raw.endswith(b"\n") else raw, digest_size=16).digest()
            if d in wanted and d not in found:
                found[d] = lineno
                if len(found) == len(wanted):
                    break
    return found


def _length_stats(hist: dict[int, int], unit: str) -> LengthStats:
    count = sum(hist.values())
    if not count:
        return LengthStats(unit=unit)  # type: ignore[arg-type]
    keys = sorted(hist)
    total = sum(k * v for k, v in hist.items())

    def pct(q: float) -> int:
        # Nearest-rank percentile: the smallest length with at least q of the rows at or below it.
        rank = max(1, -(-int(q * count * 1000) // 1000))
        seen = 0
        for k in keys:
            seen += hist[k]
            if seen >= rank:
                return k
        return keys[-1]

    return LengthStats(unit=unit, count=count, min=keys[0], max=keys[-1], mean=total / count,  # type: ignore[arg-type]
                       p50=pct(0.5), p95=pct(0.95))


def validate(
    path: str | os.PathLike[str],
    *,
    rules: DataRules | None = None,
    tokenizer: Any = None,
    max_problems: int = 100,
) -> ValidationReport:
    """Check a JSONL training file without loading it; return a report listing every problem.

    Invalid data never raises: it becomes problems in the report. A missing or unreadable path is a
    usage error (``ConfigError``). With ``tokenizer`` (a Hugging Face tokenizer) lengths are in tokens.
    """
    rules = rules or DataRules()
    p = Path(path)
    if not p.is_file():
        what = "is not a file" if p.exists() else "no such file"
        raise ConfigError(f"{p}: {what}", field="data", hint="check the path of the training file (a .jsonl file)")
    scan = _Scan(str(p), rules, tokenizer, max(0, max_problems))
    sha = hashlib.sha256()
    try:
        size = p.stat().st_size
        if rules.max_bytes is not None and size > rules.max_bytes:
            who = rules.backend or "this backend"
            scan.add(None, None, "file_too_large",
                     f"file is {size:,} bytes; {who} accepts at most {rules.max_bytes:,}: split it")
        if size == 0:
            scan.add(None, None, "empty_file", "file is empty: it needs one JSON row per line")
        with open(p, "rb") as f:
            scan.run(f, sha)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}", field="data") from exc
    scan.finish()
    if scan.dup_digests:
        first = _first_lines(p, set(scan.dup_digests.values()))
        fixed = []
        for line, field, code, message in scan.problems:
            if code == "duplicate_row" and line in scan.dup_digests:
                message = f"duplicate of line {first.get(scan.dup_digests[line], '?')}: remove it"
            fixed.append((line, field, code, message))
        scan.problems = fixed
    problem_count = sum(scan.counts.values())
    return ValidationReport(
        path=str(p),
        valid=problem_count == 0,
        kind=scan.kind,
        rows=scan.rows,
        lines=scan.lines,
        sha256=sha.hexdigest(),
        size_bytes=size,
        problems=[Problem(line=a, field=b, code=c, message=d) for a, b, c, d in scan.problems],
        problem_count=problem_count,
        problem_counts=dict(sorted(scan.counts.items())),
        length=_length_stats(scan.hist, "characters" if tokenizer is None else "tokens"),
        backend=rules.backend,
    )


def data_entry(report: ValidationReport) -> dict[str, Any]:
    """What a job records of one validated data file (its ``data["train"]`` / ``data["validation"]``)."""
    return {"path": str(Path(report.path).resolve()), "sha256": report.sha256, "rows": report.rows,
            "kind": report.kind.value if report.kind else None, "size_bytes": report.size_bytes}
