"""Fireworks datasets: create the record, upload the bytes (streaming), wait until READY.

Flow (fireworks-ai 1.2.30 ``resources/datasets.py`` and ``lib/dataset_upload.py``):

1. ``POST .../datasets`` with a client-chosen ``datasetId`` and ``exampleCount`` (a retry after a dropped
   connection gets 409 ALREADY_EXISTS: the record is then read back, never duplicated);
2. files up to 150 MB: ``POST .../datasets/{id}:upload`` (multipart field ``file``), streamed from the
   open file; bigger ones: ``:getUploadEndpoint`` -> PUT to the signed URL (no Fireworks credentials, the
   two signed headers) -> ``:validateUpload``;
3. ``GET .../datasets/{id}`` until ``state == READY``; a non-OK ``status`` fails with Fireworks' message.

A dataset already READY (an earlier attempt of the same job) is not uploaded again.

The backend hands over only what the upload needs: its ``call`` (an SDK call under the retry policy, errors
translated) and :class:`UploadSettings`; nothing here knows the backend.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from ..._exceptions import APIError, api_error_for_status

UPLOAD_LIMIT = 150 * 1024 * 1024   # ":upload ... can handle file sizes up to 150Mb"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class UploadSettings:
    """The backend options that steer an upload (docs/backends/fireworks.md)."""

    upload_limit: int = UPLOAD_LIMIT        # bytes above which the signed-URL path is taken
    upload_timeout: float = 600.0           # s for the signed-URL PUT
    poll_interval: float = 2.0              # s between dataset state checks
    ready_timeout: float = 1800.0           # s to wait for READY


def _create_or_get(client: Any, dataset_id: str, rows: int, display_name: str) -> Any:
    import fireworks

    try:
        return client.datasets.create(dataset_id=dataset_id, dataset={
            "user_uploaded": {}, "example_count": str(rows), "display_name": display_name})
    except fireworks.ConflictError:  # our earlier attempt created it
        return client.datasets.get(dataset_id)


def _upload_multipart(client: Any, dataset_id: str, path: str) -> Any:
    # Opened per attempt (a retry must not reuse a consumed handle); httpx streams the handle.
    with open(path, "rb") as fh:
        return client.datasets.upload(dataset_id, file=(f"{dataset_id}.jsonl", fh, "application/jsonl"))


def _chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            yield block


def _put_signed(url: str, path: str, size: int, timeout: float) -> None:
    """PUT the file to a signed URL with a plain client: the URL must never see Fireworks credentials."""
    import httpx

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size),
               # Both headers are part of the signature.
               "X-Goog-Content-Length-Range": f"{size},{size}"}
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=30.0)) as http:
            response = http.put(url, content=_chunks(path), headers=headers)
    except httpx.TransportError as exc:
        raise api_error_for_status(None, f"fireworks: signed-URL upload failed: {type(exc).__name__}",
                                   provider="fireworks") from None
    if response.status_code >= 300:
        # The URL carries a signature: never echo it.
        raise api_error_for_status(response.status_code,
                                   f"fireworks: signed-URL upload rejected (HTTP {response.status_code})",
                                   provider="fireworks")


def _check_signed_url(url: str | None, name: str) -> str:
    if not url:
        raise APIError(f"fireworks: no signed upload URL returned for {name}", provider="fireworks")
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise APIError(f"fireworks: refusing a non-https upload URL for {name}", provider="fireworks")
    return url


def upload_dataset(call: Callable[..., Any], client: Any, dataset_id: str, path: str, rows: int,
                   display_name: str, *, account_id: str, settings: UploadSettings) -> str:
    """Make ``dataset_id`` hold ``path`` and be READY; return its resource name. ``call(fn, *args)`` runs
    one SDK call under the retry policy."""
    ds = call(_create_or_get, client, dataset_id, rows, display_name)
    if ds.state != "READY":
        size = os.path.getsize(path)
        if size <= settings.upload_limit:
            call(_upload_multipart, client, dataset_id, path)
        else:
            name = f"{dataset_id}.jsonl"
            endpoint = call(lambda c: c.datasets.get_upload_endpoint(
                dataset_id, filename_to_size={name: str(size)}), client)
            url = _check_signed_url((endpoint.filename_to_signed_urls or {}).get(name), name)
            call(_put_signed, url, path, size, settings.upload_timeout)
            call(lambda c: c.datasets.validate_upload(dataset_id, body={}), client)
        ds = wait_ready(call, client, dataset_id, settings)
    return ds.name or f"accounts/{account_id}/datasets/{dataset_id}"


def wait_ready(call: Callable[..., Any], client: Any, dataset_id: str, settings: UploadSettings) -> Any:
    deadline = time.monotonic() + settings.ready_timeout
    while True:
        ds = call(lambda c: c.datasets.get(dataset_id), client)
        status = ds.status
        if status is not None and status.code not in (None, "OK"):
            raise APIError(f"fireworks: dataset {dataset_id} was not accepted: {status.code}: {status.message}",
                           provider="fireworks", hint="fix the data and submit a new job")
        if ds.state == "READY":
            return ds
        if time.monotonic() >= deadline:
            raise APIError(f"fireworks: dataset {dataset_id} still {ds.state} after {settings.ready_timeout:g}s",
                           provider="fireworks", hint="raise dataset_timeout (backend option) and submit again")
        time.sleep(settings.poll_interval)
