"""Fireworks datasets: create the record, upload the bytes (streaming), wait until READY.

Flow (fireworks-ai 1.2.30 ``resources/datasets.py`` and ``lib/dataset_upload.py``):

1. ``POST .../datasets`` with a client-chosen ``datasetId`` and ``exampleCount`` (a retry after a dropped
   connection gets 409 ALREADY_EXISTS: the record is then read back, never duplicated);
2. files up to 150 MB: ``POST .../datasets/{id}:upload`` (multipart field ``file``), streamed from the
   open file; bigger ones: ``:getUploadEndpoint`` -> PUT to the signed URL (no Fireworks credentials, the
   two signed headers) -> ``:validateUpload``;
3. ``GET .../datasets/{id}`` until ``state == READY``; a non-OK ``status`` fails with Fireworks' message.

A dataset already READY (an earlier attempt of the same job) is not uploaded again.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

from ..._exceptions import APIError, api_error_for_status

if TYPE_CHECKING:
    from .backend import FireworksBackend

UPLOAD_LIMIT = 150 * 1024 * 1024   # ":upload ... can handle file sizes up to 150Mb"
CHUNK = 1024 * 1024
_open = open  # module-level so a test can watch how the file is read (never whole)


def _create_or_get(client: Any, dataset_id: str, rows: int, display_name: str) -> Any:
    import fireworks

    try:
        return client.datasets.create(dataset_id=dataset_id, dataset={
            "user_uploaded": {}, "example_count": str(rows), "display_name": display_name})
    except fireworks.ConflictError:  # our earlier attempt created it
        return client.datasets.get(dataset_id)


def _upload_multipart(client: Any, dataset_id: str, path: str) -> Any:
    # Opened per attempt (a retry must not reuse a consumed handle); httpx streams the handle.
    with _open(path, "rb") as fh:
        return client.datasets.upload(dataset_id, file=(f"{dataset_id}.jsonl", fh, "application/jsonl"))


def _chunks(path: str) -> Iterator[bytes]:
    with _open(path, "rb") as fh:
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


def upload_dataset(backend: "FireworksBackend", dataset_id: str, path: str, rows: int, display_name: str) -> str:
    """Make ``dataset_id`` hold ``path`` and be READY; return its resource name."""
    client = backend.client
    ds = backend.call(_create_or_get, client, dataset_id, rows, display_name)
    if ds.state != "READY":
        size = os.path.getsize(path)
        if size <= backend.upload_limit:
            backend.call(_upload_multipart, client, dataset_id, path)
        else:
            name = f"{dataset_id}.jsonl"
            endpoint = backend.call(lambda c: c.datasets.get_upload_endpoint(
                dataset_id, filename_to_size={name: str(size)}), client)
            url = _check_signed_url((endpoint.filename_to_signed_urls or {}).get(name), name)
            backend.call(_put_signed, url, path, size, backend.upload_timeout)
            backend.call(lambda c: c.datasets.validate_upload(dataset_id, body={}), client)
        ds = wait_ready(backend, dataset_id)
    return ds.name or f"accounts/{backend.account_id}/datasets/{dataset_id}"


def wait_ready(backend: "FireworksBackend", dataset_id: str) -> Any:
    deadline = time.monotonic() + backend.dataset_timeout
    while True:
        ds = backend.call(lambda c: c.datasets.get(dataset_id), backend.client)
        status = ds.status
        if status is not None and status.code not in (None, "OK"):
            raise APIError(f"fireworks: dataset {dataset_id} was not accepted: {status.code}: {status.message}",
                           provider="fireworks", hint="fix the data and submit a new job")
        if ds.state == "READY":
            return ds
        if time.monotonic() >= deadline:
            raise APIError(f"fireworks: dataset {dataset_id} still {ds.state} after {backend.dataset_timeout:g}s",
                           provider="fireworks", hint="raise dataset_timeout (backend option) and submit again")
        time.sleep(backend.dataset_poll_interval)
