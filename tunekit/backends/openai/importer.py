"""Import an OpenAI account's fine-tuning jobs into the tunekit store (``tunekit import openai``).

Each OpenAI job becomes a tunekit job on backend ``openai`` holding its remote id, so ``jobs list``,
``jobs status/events/metrics``, ``adapters list`` and ``finetune --from`` work on it like on any other job.
The training and validation files are streamed to ``$TUNEKIT_HOME/imports/openai/<ftjob>/`` with their
sha256; a file OpenAI has deleted (404) is recorded as missing with a note, never a crash. Importing again
updates the same tunekit job (keyed on the OpenAI job id): nothing is duplicated.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..._exceptions import APIError, ConfigError, NotFoundError
from ...schemas.job import JobEvent

if TYPE_CHECKING:
    from ...job import FineTuneJob
    from ...store import Store
    from .backend import OpenAIBackend

PAGE = 100  # items per list call (the API's maximum for jobs, events and checkpoints)

log = logging.getLogger(__name__)


def import_jobs(backend: "OpenAIBackend", job_ids: Iterable[str] = (), *, all_jobs: bool = False,
                store: "Store | None" = None) -> list["FineTuneJob"]:
    """Import the named jobs (``ftjob-...``) or, with ``all_jobs``, every job of the account."""
    from ...store import default_store

    job_ids = list(job_ids)
    if bool(job_ids) == all_jobs:
        raise ConfigError("name the OpenAI jobs to import (ftjob-...) or ask for all of them, not both or neither",
                          field="jobs", hint="tunekit import openai ftjob-abc123   or   tunekit import openai --all")
    store = store or default_store()
    if all_jobs:
        remotes = all_pages(backend, lambda c: c.fine_tuning.jobs.list(limit=PAGE))
    else:  # look every id up first: a wrong id fails before anything is written
        remotes = [backend.call(backend._retrieve, backend.client, job_id) for job_id in job_ids]
    return [import_job(backend, raw, store) for raw in remotes]


def all_pages(backend: "OpenAIBackend", first: Callable[[Any], Any]) -> list[Any]:
    """Every item of a cursor-paginated list, each page fetched under the retry policy."""
    page = backend.call(first, backend.client)
    items = list(page.data)
    while page.has_next_page():
        page = backend.call(page.get_next_page)
        items += page.data
    return items


def import_job(backend: "OpenAIBackend", raw: Any, store: "Store") -> "FineTuneJob":
    from ...job import FineTuneJob

    record = store.find_job(backend.name, raw.id)
    if record is None:
        data = download_data(backend, raw, Path(store.path).parent / "imports" / "openai" / raw.id)
        record = store.create_job(backend.name, spec_of(raw, data), data, request=request_of(raw), remote_id=raw.id)
        store.add_event(record.id, JobEvent(created_at=time.time(), type="import",
                                            message=f"imported from OpenAI job {raw.id}",
                                            data={"remote_id": raw.id, "created_at": raw.created_at}))
        for note in data.get("import_notes", []):
            store.add_event(record.id, JobEvent(created_at=time.time(), level="warning", type="import",
                                                message=note))
    else:
        spec = spec_of(raw, record.data)  # OpenAI resolves 'auto' settings once the job runs
        if spec != record.spec:
            record = store.update_job(record.id, spec=spec, request=request_of(raw))
    job = FineTuneJob(record, store=store, backend=backend)
    state = backend.to_state(raw)
    if state.result is not None:
        try:
            pages = all_pages(backend, lambda c: c.fine_tuning.jobs.checkpoints.list(raw.id, limit=PAGE))
            state.result.checkpoints = backend.to_checkpoints(SimpleNamespace(data=pages))
        except APIError as exc:  # the job still succeeded; checkpoints are a bonus
            log.warning("openai: could not list checkpoints of %s: %s", raw.id, exc)
    job.apply(state)  # a succeeded job's model enters the adapter registry here, once
    events = all_pages(backend, lambda c: c.fine_tuning.jobs.list_events(raw.id, limit=PAGE))
    job._store_events(backend.to_events(SimpleNamespace(data=events), job.record))
    _store_metrics(backend, job, state.result.checkpoints if state.result else [], raw.result_files or [])
    return job


# -- data --------------------------------------------------------------------------------------------------

def download_data(backend: "OpenAIBackend", raw: Any, folder: Path) -> dict[str, Any]:
    """Training/validation files -> the job's data entries (files kept in ``folder``, next to the store:
    ``$TUNEKIT_HOME/imports/openai/<ftjob>``); a deleted file is an entry marked missing."""
    from ...data import data_entry, validate

    data: dict[str, Any] = {"source": {"provider": "openai", "job_id": raw.id,
                                       "method": raw.method.type if raw.method else "supervised"}}
    notes: list[str] = []
    for split, file_id in (("train", raw.training_file), ("validation", raw.validation_file)):
        if not file_id:
            continue
        dest = folder / f"{split}-{file_id}.jsonl"
        try:
            download(backend, file_id, dest)
        except NotFoundError:
            data[split] = {"provider_file": file_id, "missing": True}
            notes.append(f"{split} file {file_id} of {raw.id} no longer exists at OpenAI (404): its data was not "
                         "imported" + (f"; rebuild a training set from the model's answers with `tunekit distill "
                                       f"--model {raw.fine_tuned_model} --prompts FILE --out FILE`"
                                       if raw.fine_tuned_model else ""))
            continue
        report = validate(dest)
        data[split] = {**data_entry(report), "provider_file": file_id}
        if not report.valid:
            notes.append(f"{split} file {file_id} kept at {dest} has {len(report.problems)} problem(s) by tunekit's "
                         f"rules; see `tunekit validate {dest}`")
    if notes:
        data["import_notes"] = notes
    return data


def download(backend: "OpenAIBackend", file_id: str, dest: Path) -> None:
    """Stream a file's content to ``dest`` (written to a side file, then renamed: never a partial file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def once(client: Any) -> None:
        with client.files.with_streaming_response.content(file_id) as response, open(part, "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
        os.replace(part, dest)

    try:
        backend.call(once, backend.client)
    finally:
        part.unlink(missing_ok=True)


# -- spec, request, metrics --------------------------------------------------------------------------------

def spec_of(raw: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The TrainingSpec fields the OpenAI job shows (numbers OpenAI chose, never its 'auto')."""
    from ...schemas.spec import TrainingSpec

    method = raw.method.type if raw.method else "supervised"
    hp_source = None
    if raw.method is not None and getattr(raw.method, method, None) is not None:
        hp_source = getattr(raw.method, method).hyperparameters
    hp_source = hp_source or raw.hyperparameters
    hp = hp_source.model_dump(exclude_none=True) if hp_source is not None else {}
    spec: dict[str, Any] = {"base_model": raw.model}
    if method in ("supervised", "dpo"):
        spec["method"] = "dpo" if method == "dpo" else "sft"
    hyper: dict[str, Any] = {}
    for theirs, ours in (("n_epochs", "epochs"), ("batch_size", "batch_size"), ("beta", "dpo_beta")):
        if isinstance(hp.get(theirs), (int, float)) and not isinstance(hp.get(theirs), bool):
            hyper[ours] = hp[theirs]
    if raw.seed is not None:
        hyper["seed"] = raw.seed
    if hyper:
        spec["hyperparameters"] = hyper
    multiplier = hp.get("learning_rate_multiplier")
    if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
        spec["provider_options"] = {"openai": {"learning_rate_multiplier": multiplier}}
    suffix = _suffix(raw.fine_tuned_model)
    if suffix:
        spec["suffix"] = suffix
    if data.get("validation", {}).get("path"):
        spec["validation_data"] = data["validation"]["path"]
    return TrainingSpec.model_validate(spec).model_dump(mode="json", exclude_unset=True)


def _suffix(model: str | None) -> str | None:
    """``ft:<base>:<org>:<suffix>:<id>`` -> suffix (empty when the job had none)."""
    parts = (model or "").split(":")
    return parts[3] or None if len(parts) == 5 and parts[0] == "ft" else None


def request_of(raw: Any) -> dict[str, Any]:
    """What the job was created with, as OpenAI reports it."""
    body = raw.model_dump(mode="json", exclude_none=True)
    keys = ("model", "training_file", "validation_file", "method", "hyperparameters", "seed", "metadata",
            "integrations")
    return {k: body[k] for k in keys if k in body}


def _store_metrics(backend: "OpenAIBackend", job: "FineTuneJob", checkpoints: list[dict[str, Any]],
                   result_files: list[str]) -> None:
    """Step metrics from the checkpoints and from the result file (a CSV with one row per step)."""
    from ...job import _provider_step_metrics

    rows = [{**c["metrics"], "step": c["step"]} for c in checkpoints if c.get("metrics")]
    for file_id in result_files:
        try:
            content = backend.call(lambda c: c.files.content(file_id), backend.client)
        except NotFoundError:
            job._store.add_event(job.id, JobEvent(created_at=time.time(), level="warning", type="import",
                                                  message=f"result file {file_id} no longer exists at OpenAI (404)"))
            continue
        rows += list(_csv_rows(content.text))
    for row in rows:
        if isinstance(row.get("step"), int):
            for split, values in _provider_step_metrics(row).items():
                job._store.add_metrics(job.id, row["step"], values, split=split)


def _csv_rows(text: str) -> Iterable[dict[str, Any]]:
    """step,train_loss,train_accuracy,valid_loss,... -> numbers (empty cells left out)."""
    for row in csv.DictReader(io.StringIO(text)):
        out: dict[str, Any] = {}
        for key, value in row.items():
            if key is None or value in (None, ""):
                continue
            try:
                out[key.strip()] = int(value) if key.strip() == "step" else float(value)
            except ValueError:
                continue
        yield out

