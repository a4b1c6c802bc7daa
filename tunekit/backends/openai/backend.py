"""OpenAI fine-tuning through the official ``openai`` SDK, on the ManagedBackend hooks.

Lifecycle: rows converted to what OpenAI takes (chat for SFT, preference for DPO) -> uploaded with
``purpose="fine-tune"`` (``files.create`` with an open handle, or the Uploads API in parts above
``files_api_max_bytes``; never the whole file in memory) -> ``fine_tuning.jobs.create`` tagged with
``metadata={"tunekit_job_id": <id>}`` -> retrieve / events / checkpoints / cancel. ``_find_tagged`` lists
jobs by that metadata so a dropped connection during create never makes a second paid job.

OpenAI stops accepting new fine-tuning jobs on 2027-01-06: ``submit`` warns before that day (one line
saying how to move) and refuses from that day on; the clock is injectable (``OpenAIBackend(clock=...)``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..._exceptions import APIError, ConfigError
from ..._secrets import mask_exception
from ...schemas.job import JobEvent, JobResult, JobStatus, Plan, RemoteState, map_status
from ...schemas.spec import TrainingSpec
from .._managed import Call, ManagedBackend, Steps
from ..base import PlanContext, Rule, Send
from . import mapping as m
from .upload import UploadSettings, upload_file

if TYPE_CHECKING:
    from ...store import JobRecord

log = logging.getLogger(__name__)

MOVE_HINT = ("run the same spec and data with backend='together', 'fireworks' or 'local' "
             "(see docs/backends/openai.md, 'Moving off OpenAI')")
# OpenAI's 401 message echoes a masked key ("sk-abc1****wxyz"): never pass even that part on.
_KEYLIKE = re.compile(r"\b(sk|sess)-[A-Za-z0-9_*\-]{4,}")


class OpenAIShutdownWarning(FutureWarning):
    """OpenAI stops accepting new fine-tuning jobs on 2027-01-06."""


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class OpenAIBackend(ManagedBackend):
    name: ClassVar[str] = "openai"
    field_map = m.FIELD_MAP
    options_model = m.OpenAIOptions
    options_doc = "docs/backends/openai.md"
    status_map = m.STATUS_MAP
    min_rows = 10                          # OpenAI rejects training files with fewer than 10 examples
    max_file_bytes = 8 * 1024**3           # an Upload accepts at most 8 GB
    api_key_env = ("OPENAI_API_KEY",)      # what the openai SDK itself reads
    sdk_module = "openai"
    base_url_env = ("OPENAI_BASE_URL",)

    # upload.UploadSettings, settable per class (a test lowers the size limits)
    files_api_max_bytes: ClassVar[int] = UploadSettings.files_api_max_bytes
    upload_part_bytes: ClassVar[int] = UploadSettings.part_bytes
    file_poll_seconds: ClassVar[float] = UploadSettings.poll_seconds
    file_wait_seconds: ClassVar[float] = UploadSettings.wait_seconds
    shutdown_date: ClassVar[_dt.date] = m.SHUTDOWN_DATE

    def __init__(self, *, clock: Callable[[], _dt.datetime | _dt.date] | None = None,
                 http_client: str | None = None, **options: Any) -> None:
        """``clock`` returns now (UTC) for the shutdown check; ``http_client="aiohttp"`` makes the async
        client use the SDK's aiohttp transport (``openai[aiohttp]``) instead of httpx."""
        super().__init__(**options)
        self._clock = clock or _utc_now
        self._http_client = http_client

    # -- clients -----------------------------------------------------------------------------------------
    def make_client(self, *, async_: bool) -> Any:
        import openai

        kwargs: dict[str, Any] = {"api_key": self.api_key, "max_retries": 0}
        if self.base_url:
            kwargs["base_url"] = self.base_url
        if not async_:
            return openai.OpenAI(**kwargs)
        if self._http_client == "aiohttp":
            kwargs["http_client"] = openai.DefaultAioHttpClient()
        return openai.AsyncOpenAI(**kwargs)

    def _translate(self, exc: BaseException) -> BaseException:
        err = super()._translate(exc)
        if isinstance(err, APIError):  # the SDK's error is chained to ours: a traceback shows both
            mask_exception(err, _KEYLIKE)
            mask_exception(exc, _KEYLIKE)
        return err

    # -- the 2027-01-06 shutdown ---------------------------------------------------------------------------
    def _today(self) -> _dt.date:
        now = self._clock()
        if isinstance(now, _dt.datetime):
            return (now.astimezone(_dt.timezone.utc) if now.tzinfo else now).date()
        return now

    def check_shutdown(self, *, warn: bool) -> None:
        """Refuse from the shutdown day on; before it, warn (one line) when ``warn``."""
        today = self._today()
        if today >= self.shutdown_date:
            raise ConfigError(
                f"OpenAI stopped accepting new fine-tuning jobs on {self.shutdown_date.isoformat()}; "
                "nothing was uploaded", field="backend", hint=MOVE_HINT)
        if warn:
            days = (self.shutdown_date - today).days
            warnings.warn(f"OpenAI stops accepting new fine-tuning jobs on {self.shutdown_date.isoformat()} "
                          f"(in {days} days); to move: {MOVE_HINT}", OpenAIShutdownWarning, stacklevel=3)

    # -- planning -----------------------------------------------------------------------------------------
    def base_request(self, spec: TrainingSpec, ctx: PlanContext) -> dict[str, Any]:
        self.check_shutdown(warn=False)  # plan() starts here: refuse before planning a job OpenAI won't take
        return m.base_request(spec)

    def _rule_for(self, path: str, spec: TrainingSpec) -> Rule:
        rule = super()._rule_for(path, spec)
        key = path.removeprefix(f"provider_options.{self.name}.")
        if key != path and key in m.OPTION_TARGETS and isinstance(rule, Send):
            return Send(m.OPTION_TARGETS[key](spec), convert=rule.convert, note=rule.note)
        return rule

    def plan_notes(self, spec: TrainingSpec, ctx: PlanContext) -> list[str]:
        notes = [f"OpenAI stops accepting new fine-tuning jobs on {self.shutdown_date.isoformat()}; "
                 f"to move: {MOVE_HINT}",
                 f"the job is tagged metadata.{m.TAG_KEY}=<tunekit job id> (used to find it after a dropped "
                 "connection, so a retry never creates a second job)"]
        if ctx.row_kind == "prompt_response":
            notes.append("prompt/response rows are uploaded as chat rows (user: prompt, assistant: response)")
        return notes

    # -- upload -------------------------------------------------------------------------------------------
    def upload_files(self, job: "JobRecord", spec: TrainingSpec) -> dict[str, str]:
        target = "preference" if spec.method == "dpo" else "chat"
        files = {}
        with tempfile.TemporaryDirectory(prefix="tunekit-openai-") as tmp:
            for split, key in (("train", "training_file"), ("validation", "validation_file")):
                entry = (job.data or {}).get(split)  # finetune records validation_data here too
                if entry is None:
                    if split == "train":
                        raise ConfigError(f"job {job.id} has no training data recorded", field="data")
                    continue
                path = Path(entry["path"])
                if entry.get("kind") != target:  # unknown or another kind: convert (streams row by row)
                    from ...data.convert import convert_file

                    converted = Path(tmp) / f"{split}.jsonl"
                    convert_file(path, converted, target)
                    path = converted
                files[key] = upload_file(self.call, self.client, path, filename=f"tunekit-{job.id}-{split}.jsonl",
                                         settings=self.upload_settings)
        return files

    @property
    def upload_settings(self) -> UploadSettings:
        return UploadSettings(files_api_max_bytes=self.files_api_max_bytes, part_bytes=self.upload_part_bytes,
                              poll_seconds=self.file_poll_seconds, wait_seconds=self.file_wait_seconds)

    # -- create -------------------------------------------------------------------------------------------
    def submit(self, job: "JobRecord", spec: TrainingSpec, plan: Plan) -> RemoteState:
        self.check_shutdown(warn=True)  # before any upload
        return super().submit(job, spec, plan)

    def create_kwargs(self, job: "JobRecord", plan: Plan, files: dict[str, str]) -> dict[str, Any]:
        kwargs = copy.deepcopy(plan.request)
        kwargs.pop("validation_file", None)
        kwargs.update(files)
        kwargs["metadata"] = {**(kwargs.get("metadata") or {}), m.TAG_KEY: job.id}
        return kwargs

    @staticmethod
    def _create(client: Any, kwargs: dict[str, Any]) -> Any:
        return client.fine_tuning.jobs.create(**kwargs)

    @staticmethod
    def _retrieve(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.jobs.retrieve(remote_id)

    @staticmethod
    def _cancel(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.jobs.cancel(remote_id)

    @staticmethod
    def _list_events(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.jobs.list_events(remote_id, limit=100)

    @staticmethod
    def _list_checkpoints(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.jobs.checkpoints.list(remote_id, limit=100)

    def _list_tagged(self, client: Any, job: "JobRecord") -> list[Any]:
        page = client.fine_tuning.jobs.list(metadata={m.TAG_KEY: job.id}, limit=10)
        # Check the tag too: never adopt a job the filter let through. The list is newest first.
        tagged = [r for r in page.data if (r.metadata or {}).get(m.TAG_KEY) == job.id]
        return sorted(tagged, key=lambda r: r.created_at)

    def tagged_remote(self, *, limit: int = 100) -> list[tuple[str, RemoteState]]:
        """Jobs among the account's ``limit`` most recent that carry a tunekit tag."""
        page = self.call(lambda client: client.fine_tuning.jobs.list(limit=limit), self.client)
        return [((r.metadata or {})[m.TAG_KEY], self.to_state(r)) for r in page.data
                if (r.metadata or {}).get(m.TAG_KEY)]

    # -- reading state ------------------------------------------------------------------------------------
    def to_state(self, raw: Any) -> RemoteState:
        status = map_status(self.status_map, raw.status)
        error = None
        if raw.error is not None and (raw.error.message or raw.error.code):
            extra = ", ".join(f"{k} {v}" for k, v in (("code", raw.error.code), ("param", raw.error.param)) if v)
            error = f"{raw.error.message}" + (f" ({extra})" if extra else "")
        result = None
        if status is JobStatus.SUCCEEDED:
            metrics = {"trained_tokens": raw.trained_tokens} if raw.trained_tokens is not None else {}
            if raw.result_files:
                metrics["result_files"] = list(raw.result_files)
            result = JobResult(model=raw.fine_tuned_model, metrics=metrics)
        progress: dict[str, Any] = {}
        if raw.estimated_finish and not status.terminal:
            progress["eta_s"] = max(0.0, raw.estimated_finish - time.time())
        if raw.trained_tokens is not None:
            progress["trained_tokens"] = raw.trained_tokens
        return RemoteState(remote_id=raw.id, raw_status=raw.status, status=status, error=error, result=result,
                           progress=progress)

    @staticmethod
    def to_checkpoints(page: Any) -> list[dict[str, Any]]:
        out = []
        for c in sorted(page.data, key=lambda c: c.step_number):
            metrics = c.metrics.model_dump(exclude_none=True) if c.metrics is not None else {}
            out.append({"id": c.id, "model": c.fine_tuned_model_checkpoint, "step": c.step_number,
                        "created_at": c.created_at, "metrics": metrics})
        return out

    def to_events(self, raw_events: Any, job: "JobRecord") -> list[JobEvent]:
        out = []
        for e in reversed(list(raw_events.data)):  # the API lists newest first
            data = e.data if isinstance(e.data, dict) else ({} if e.data is None else {"value": e.data})
            out.append(JobEvent(created_at=float(e.created_at), level=m.EVENT_LEVELS.get(e.level, "info"),
                                type=e.type or "message", message=e.message, data=data, remote_id=e.id))
        return out

    def refresh_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        state = yield from super().refresh_steps(job)
        if state.result is not None:
            try:
                state.result.checkpoints = self.to_checkpoints((yield Call(self._list_checkpoints, (job.remote_id,))))
            except APIError as exc:  # the job still succeeded; checkpoints are a bonus
                log.warning("openai: could not list checkpoints of %s: %s", job.remote_id, exc)
        return state
