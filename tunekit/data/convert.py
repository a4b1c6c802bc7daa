"""Reading rows and converting between row kinds, streaming (one row in memory at a time).

Conversions (anything else is a ``ConfigError``):

    prompt_response -> prompt_response   copied; 'completion' renamed 'response'
    prompt_response -> chat              [user: prompt, assistant: response]
    chat            -> chat              copied unchanged
    preference      -> chat              input messages + the preferred output (the non-preferred is dropped)
    preference      -> preference        copied unchanged

Chat rows cannot become prompt/response rows (system turns and multi-turn history would be lost),
and nothing but preference rows can become preference rows (there is no rejected answer to invent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Union

from tunekit._exceptions import ConfigError
from tunekit.data import _checks
from tunekit.data.validator import BOM, _decode
from tunekit.schemas.rows import RowKind

_ALLOWED = {
    (RowKind.PROMPT_RESPONSE, RowKind.PROMPT_RESPONSE),
    (RowKind.PROMPT_RESPONSE, RowKind.CHAT),
    (RowKind.CHAT, RowKind.CHAT),
    (RowKind.PREFERENCE, RowKind.CHAT),
    (RowKind.PREFERENCE, RowKind.PREFERENCE),
}


def iter_rows(path: Union[str, os.PathLike[str]]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each row of a JSONL file; blank lines are skipped.

    Meant for files that passed ``validate``; a line that does not parse to an object raises
    ``ConfigError`` naming the file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file", field="data", hint="check the path of the data file")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                obj = _decode(raw.decode())
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"{p}:{lineno}: not a JSON row ({exc})", field="data",
                                  hint=f"run `tunekit validate {p}` to see every problem") from exc
            if type(obj) is not dict:
                raise ConfigError(f"{p}:{lineno}: line is not a JSON object", field="data",
                                  hint=f"run `tunekit validate {p}` to see every problem")
            yield lineno, obj


def _kind(kind: Union[RowKind, str]) -> RowKind:
    try:
        return RowKind(kind)
    except ValueError:
        raise ConfigError(f"unknown row kind {kind!r}; use one of: {', '.join(k.value for k in RowKind)}",
                          field="kind") from None


def to_chat_row(row: dict, kind: Union[RowKind, str]) -> dict:
    """The chat form of a valid row. Chat rows are returned unchanged (the same object)."""
    kind = _kind(kind)
    if kind is RowKind.CHAT:
        return row
    if kind is RowKind.PROMPT_RESPONSE:
        answer = row["response"] if "response" in row else row["completion"]
        return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]}
    out: dict[str, Any] = {"messages": list(row["input"]["messages"]) + list(row["preferred_output"])}
    if "tools" in row["input"]:
        out["tools"] = row["input"]["tools"]
    return out


def convert_row(row: dict, source: Union[RowKind, str], target: Union[RowKind, str]) -> dict:
    """Convert one valid row; raises ``ConfigError`` for a conversion that cannot be done."""
    source, target = _kind(source), _kind(target)
    if (source, target) not in _ALLOWED:
        raise ConfigError(
            f"cannot convert {source.value} rows to {target.value} rows",
            field="kind",
            hint="allowed: prompt_response -> chat, preference -> chat, and any kind to itself",
        )
    if target is RowKind.CHAT:
        return to_chat_row(row, source)
    if source is RowKind.PROMPT_RESPONSE:
        return {"prompt": row["prompt"], "response": row["response"] if "response" in row else row["completion"]}
    return row


def convert_file(
    src: Union[str, os.PathLike[str]], dst: Union[str, os.PathLike[str]], target: Union[RowKind, str]
) -> int:
    """Write ``src``'s rows as ``target`` rows to ``dst``; return the rows written.

    Streams both files. Each row is checked on the way (a bad row raises ``ConfigError`` naming its
    line); ``dst`` is written to a temporary file and renamed into place only when every row converted.
    """
    target = _kind(target)
    src_p, dst_p = Path(src), Path(dst)
    if src_p.resolve() == dst_p.resolve():
        raise ConfigError(f"{dst_p}: destination is the source file", field="dst", hint="write to a new file")
    tmp = dst_p.with_name(dst_p.name + ".tmp")
    source: RowKind | None = None
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for lineno, row in iter_rows(src_p):
                kind = _checks.guess_kind(row)
                issues = _checks.check_row(row, kind) if kind is not None else [_checks.unknown_kind_issue(row)]
                if source is None and kind is not None and (kind, target) not in _ALLOWED:
                    convert_row(row, kind, target)  # raises the conversion error before any work is done
                if issues or (source is not None and kind is not source):
                    why = issues[0][2] if issues else f"{kind} row in a {source} file"
                    raise ConfigError(f"{src_p}:{lineno}: {why}", field="data",
                                      hint=f"run `tunekit validate {src_p}` to see every problem")
                source = kind
                new = convert_row(row, kind, target)
                try:
                    out.write(json.dumps(new, ensure_ascii=False) + "\n")
                except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): keep it escaped
                    out.write(json.dumps(new) + "\n")
                written += 1
        os.replace(tmp, dst_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written
