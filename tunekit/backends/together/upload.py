"""Getting a validated tunekit JSONL file into the shape Together's upload takes, streaming.

Together accepts tunekit's chat rows (``messages``) and preference rows (``input`` / ``preferred_output`` /
``non_preferred_output``) as they are, and prompt/response rows as its *instruction* format, which names the
answer ``completion``. So only two things ever need a rewritten copy:

- prompt/response rows (``response`` renamed ``completion``; Together masks the prompt by default);
- a name not ending in ``.jsonl`` (the SDK picks the file type from the extension and refuses others).

Anything else is uploaded from the user's file itself. A rewritten copy is deterministic, so re-submitting
the same data uploads the same bytes and Together's sha256 de-duplication returns the existing file.

The backend hands over only what the upload needs: its ``call`` (an SDK call under the retry policy, errors
translated) and the client.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..._exceptions import ConfigError
from ...data.convert import iter_rows


def needs_copy(src: Path, kind: str | None) -> bool:
    return kind == "prompt_response" or src.suffix != ".jsonl"


def together_row(row: dict, kind: str | None) -> dict:
    """One tunekit row as Together takes it."""
    if kind == "prompt_response":
        answer = row["completion"] if "completion" in row else row["response"]
        return {"prompt": row["prompt"], "completion": answer}
    return row


def prepare_upload(src: str | Path, kind: str | None, workdir: Path) -> Path:
    """The path to upload: ``src`` itself, or a rewritten copy in ``workdir`` (one row in memory at a time)."""
    src = Path(src)
    if not needs_copy(src, kind):
        return src
    dst = workdir / f"{src.stem}.jsonl"
    with open(dst, "w", encoding="utf-8", newline="\n") as out:
        for _, row in iter_rows(src):
            new = together_row(row, kind)
            try:
                line = json.dumps(new, ensure_ascii=False)
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): keep it escaped
                line = json.dumps(new)
            out.write(line + "\n")
    return dst


def upload(call: Callable[..., Any], client: Any, entry: dict[str, Any]) -> str:
    """Upload one recorded data file (a job's ``data[split]``) with ``purpose="fine-tune"``; return its file id."""
    with tempfile.TemporaryDirectory(prefix="tunekit-together-") as tmp:
        path = prepare_upload(entry["path"], entry.get("kind"), Path(tmp))
        uploaded = call(upload_file, client, path)
    status = str(getattr(uploaded, "processing_status", "") or "")
    if status.upper() in ("FAILED", "INVALID_FORMAT"):
        raise ConfigError(f"together rejected {entry['path']} ({status}) after upload as file {uploaded.id}",
                          field="data", hint="check the file with `tunekit validate --backend together`")
    return str(uploaded.id)


def upload_file(client: Any, path: Path) -> Any:
    """The SDK's upload: POST /files (sha256) -> presigned PUT -> preprocess; a 409 returns the existing file."""
    from together.lib.types.error import FileTypeError

    try:
        return client.files.upload(file=path, purpose="fine-tune", check=True)
    except FileTypeError as exc:  # the SDK's local check (JSON per line, size, extension)
        raise ConfigError(f"together SDK refused {path.name}: {exc}", field="data",
                          hint="run `tunekit validate --backend together` on the file") from exc
