"""Uploading a JSONL file to OpenAI for fine-tuning, streamed (never the whole file in memory).

Up to ``files_api_max_bytes`` (512 MB): ``files.create`` with an open handle. Above: the Uploads API,
create -> parts of at most ``part_bytes`` (64 MB), each streamed from the file and retried alone ->
complete with the md5; a failure cancels the Upload. Then ``files.retrieve`` until the file is processed.

The backend hands over only what the upload needs: its ``call`` (an SDK call under the retry policy, errors
translated), the client and :class:`UploadSettings`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..._exceptions import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadSettings:
    files_api_max_bytes: int = 512 * 1024**2   # POST /files limit; above it the Uploads API is used
    part_bytes: int = 64 * 1024**2             # Uploads API: at most 64 MB per part
    poll_seconds: float = 2.0                  # while an uploaded file is still being processed
    wait_seconds: float = 1800.0


class FileWindow(io.RawIOBase):
    """A read-only view of ``length`` bytes of an open file from ``start``: one Uploads-API part, streamed
    by the HTTP client in small chunks (and re-read from its start if a retry re-sends it)."""

    def __init__(self, fh: Any, start: int, length: int, name: str) -> None:
        super().__init__()
        self._fh, self._start, self._length, self._pos = fh, start, length, 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def upload_file(call: Callable[..., Any], client: Any, path: str | Path, *, filename: str | None = None,
                settings: UploadSettings) -> str:
    """Upload one JSONL file for fine-tuning; return its file id once OpenAI has processed it."""
    path = Path(path)
    filename = filename or path.name
    size = path.stat().st_size
    if size > settings.files_api_max_bytes:
        file = upload_in_parts(call, client, path, filename, size, settings)
    else:
        with open(path, "rb") as fh:  # a handle, not a path: the SDK reads a Path whole into memory
            file = call(create_file, client, (filename, fh))
    return wait_processed(call, client, file, settings)


def create_file(client: Any, file: Any) -> Any:
    return client.files.create(file=file, purpose="fine-tune")


def upload_in_parts(call: Callable[..., Any], client: Any, path: Path, filename: str, size: int,
                    settings: UploadSettings) -> Any:
    """Uploads API: create -> parts (each streamed from the file, retried alone) -> complete (+ md5)."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            md5.update(block)
    upload = call(client.uploads.create, bytes=size, filename=filename, mime_type="text/jsonl", purpose="fine-tune")
    part_ids = []
    try:
        with open(path, "rb") as fh:
            for start in range(0, size, settings.part_bytes):
                window = FileWindow(fh, start, min(settings.part_bytes, size - start), filename)
                part = call(client.uploads.parts.create, upload_id=upload.id, data=window)
                part_ids.append(part.id)
        done = call(client.uploads.complete, upload_id=upload.id, part_ids=part_ids, md5=md5.hexdigest())
    except BaseException:
        try:  # best effort: an abandoned Upload would otherwise linger until it expires (1 hour)
            call(client.uploads.cancel, upload.id)
        except Exception:  # noqa: BLE001 - the original error matters more
            log.debug("could not cancel upload %s", upload.id)
        raise
    if done.status != "completed" or done.file is None:
        raise APIError(f"openai: upload {upload.id} ended {done.status!r} without a file", provider="openai",
                       hint="retry the submit; the data was not attached to any job")
    return done.file


def wait_processed(call: Callable[..., Any], client: Any, file: Any, settings: UploadSettings) -> str:
    """Files are usable once processed; status is deprecated, so a missing one counts as ready."""
    deadline = time.monotonic() + settings.wait_seconds
    while getattr(file, "status", None) == "uploaded" and time.monotonic() < deadline:
        time.sleep(settings.poll_seconds)
        file = call(client.files.retrieve, file.id)
    if getattr(file, "status", None) == "error":
        detail = getattr(file, "status_details", None) or "no details"
        raise APIError(f"openai: file {file.id} failed processing: {detail}", provider="openai",
                       hint="run `tunekit validate` on the data with --backend openai")
    return file.id
