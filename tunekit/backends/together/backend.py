"""Together AI backend: LoRA SFT and DPO through the official ``together`` SDK (3.x).

Lifecycle, all through SDK calls (the SDK is imported on first use, never at module import):

    upload     client.files.upload(path, purpose="fine-tune", check=True)
               POST /v1/files (sha256 checksum) -> 302 presigned URL -> PUT bytes -> POST /v1/files/{id}/preprocess;
               a 409 means Together already has these bytes: the SDK returns the existing file
    limits     client.fine_tuning.model_limits(model_name)      checked before the paid create, naming fields
    create     client.fine_tuning.create(**plan.request, training_file=..., suffix="<suffix>-<job id>")
               (the SDK also POSTs /v1/fine-tunes/estimate-price before POST /v1/fine-tunes: tunekit keeps
               that figure and stops above max_cost, see _watch_estimates)
    retrieve   client.fine_tuning.retrieve(id)                  + list_checkpoints(id) once completed
    events     client.fine_tuning.list_events(id)               (unpaged; de-duplicated by event hash)
    cancel     client.fine_tuning.cancel(id)
    find       client.fine_tuning.list() and the job whose suffix ends with the tunekit job id
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from ..._exceptions import ConfigError, NotFoundError
from ..._settings import env_credential
from ...schemas.job import JobEvent, JobResult, JobStatus, Plan, RemoteState, map_status
from ...schemas.spec import TrainingSpec
from .._managed import Call, ManagedBackend, Steps
from ..base import PlanContext
from . import mapping
from .upload import upload

if TYPE_CHECKING:
    from ...store import JobRecord

log = logging.getLogger(__name__)

# The SDK refuses files over MAX_FILE_SIZE_GB = 50.1 (GiB) (together/lib/constants.py); the docs say 100 GB.
MAX_FILE_BYTES = int(50.1 * 2**30)
_LEVELS = {"info": "info", "warning": "warning", "iwarning": "warning", "error": "error", "ierror": "error"}
_ERROR_EVENTS = ("job_error", "job_user_error")
_EVENT_DATA = ("step", "total_steps", "checkpoint_path", "model_path", "wandb_url", "token_count", "param_count",
               "training_offset")


class TogetherBackend(ManagedBackend):
    name: ClassVar[str] = "together"
    api_key_env = ("TOGETHER_API_KEY",)
    sdk_module = "together"
    base_url_env = ("TOGETHER_BASE_URL",)
    field_map = mapping.FIELD_MAP
    options_model = mapping.TogetherOptions
    options_doc = "docs/backends/together.md"
    status_map = mapping.STATUS_MAP
    min_rows = 1                  # the SDK's MIN_SAMPLES; Together documents no other minimum
    row_kinds = None              # prompt/response, chat and preference rows are all accepted
    max_file_bytes = MAX_FILE_BYTES

    # -- planning ----------------------------------------------------------------------------------------
    def base_request(self, spec: TrainingSpec, ctx: PlanContext) -> dict[str, Any]:
        return mapping.base_request(spec)

    def plan_notes(self, spec: TrainingSpec, ctx: PlanContext) -> list[str]:
        return mapping.plan_notes(spec)

    # -- client ------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str | None:
        """The SDK adds /v1 to every path, so a base URL copied from the spec (".../v1") loses it."""
        url = self._base_url
        if url and url.rstrip("/").endswith("/v1"):
            url = url.rstrip("/")[: -len("/v1")]
        return url

    def make_client(self, *, async_: bool) -> Any:
        from together import AsyncTogether, Together

        cls = AsyncTogether if async_ else Together
        client = cls(api_key=self.api_key, base_url=self.base_url, max_retries=0)
        if not async_:  # jobs are created through the sync client
            self._watch_estimates(client)
        return client

    # -- upload ------------------------------------------------------------------------------------------
    def upload_files(self, job: "JobRecord", spec: TrainingSpec) -> dict[str, str]:
        data = job.data or {}
        if "train" not in data:
            raise ConfigError(f"job {job.id} records no training data", field="data")
        files = {"training_file": upload(self.call, self.client, data["train"])}
        if data.get("validation"):
            files["validation_file"] = upload(self.call, self.client, data["validation"])
        return files

    # -- create ------------------------------------------------------------------------------------------
    def create_kwargs(self, job: "JobRecord", plan: Plan, files: dict[str, str]) -> dict[str, Any]:
        kwargs = {**plan.request, **files}
        kwargs["suffix"] = mapping.tagged_suffix(kwargs.get("suffix"), job.id)
        if any(key in kwargs for key in mapping.WANDB_OPTIONS):
            key = env_credential("WANDB_API_KEY")
            if not key:
                raise ConfigError("Weights & Biases options are set but WANDB_API_KEY is not",
                                  field="provider_options.together", hint="export WANDB_API_KEY=...")
            kwargs["wandb_api_key"] = key  # read now, never stored in the plan or the store
        limits = self.call(self._model_limits, self.client, kwargs["model"])
        mapping.check_limits(kwargs, limits, kwargs.get("training_method", "sft"))
        user_evals = any(f.field == "provider_options.together.n_evals" for f in plan.fields)
        max_evals = getattr(limits, "max_num_evals", None)
        if "n_evals" in kwargs and not user_evals and max_evals and kwargs["n_evals"] > max_evals:
            kwargs["n_evals"] = max_evals
        kwargs["model_limits"] = limits  # so the SDK does not fetch them a second time
        return kwargs

    @staticmethod
    def _model_limits(client: Any, model: str) -> Any:
        return client.fine_tuning.model_limits(model_name=model)

    @staticmethod
    def _create(client: Any, kwargs: dict[str, Any]) -> Any:
        try:
            return client.fine_tuning.create(**kwargs)
        except ValueError as exc:  # the SDK's own parameter checks, before any request is sent
            raise ConfigError(f"together SDK refused the job parameters: {exc}",
                              hint="change the field named in the message, then submit again") from exc

    def _watch_estimates(self, client: Any) -> None:
        """The SDK posts estimate-price before its create: keep Together's figure and stop above max_cost.

        Wraps this client's ``fine_tuning.estimate_price`` (an instance attribute; the SDK class is untouched),
        so the one estimate request the SDK makes is the one checked.
        """
        ft = client.fine_tuning
        sdk_estimate = ft.estimate_price

        def estimate_price(**params: Any) -> Any:
            answer = sdk_estimate(**params)
            if getattr(answer, "estimation_available", None) is not False:  # as the SDK reads it
                self.provider_estimate = answer.model_dump(exclude_none=True)
                self._check_estimate(answer)
            return answer

        ft.estimate_price = estimate_price

    def _check_estimate(self, answer: Any) -> None:
        from ...cost import CostEstimate, check_limit

        price = getattr(answer, "estimated_total_price", None)
        if price is None:
            return
        est = CostEstimate(backend=self.name, tokens=int(getattr(answer, "estimated_train_token_count", 0) or 0),
                           usd=float(price), basis="Together's estimate-price")
        check_limit(est, self.max_cost, what="Together's estimate")

    # -- the other SDK calls (hooks: each returns what the SDK returns, sync or awaitable) ------------------
    @staticmethod
    def _retrieve(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.retrieve(remote_id)

    @staticmethod
    def _cancel(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.cancel(remote_id)

    @staticmethod
    def _list_events(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.list_events(remote_id)

    @staticmethod
    def _list_checkpoints(client: Any, remote_id: str) -> Any:
        return client.fine_tuning.list_checkpoints(remote_id)

    @staticmethod
    def _list(client: Any) -> Any:
        return client.fine_tuning.list()

    def _list_tagged(self, client: Any, job: "JobRecord") -> list[Any]:
        return tagged_items(client.fine_tuning.list(), job.id)

    def tagged_remote(self) -> list[tuple[str, RemoteState]]:
        """Every job of the account whose suffix ends with a tunekit job id."""
        items = as_dict(self.call(self._list, self.client)).get("data") or []
        out = []
        for item in items:
            tag = mapping.tag_of(as_dict(item))
            if tag:
                out.append((tag, self.to_state(item)))
        return out

    # -- lifecycle additions ---------------------------------------------------------------------------------
    def refresh_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        state = yield from super().refresh_steps(job)
        if state.status is JobStatus.SUCCEEDED and state.result is not None:
            try:
                raw = yield Call(self._list_checkpoints, (job.remote_id,))
            except NotFoundError:
                raw = None
            state.result.checkpoints = to_checkpoints(raw)
        return state

    def cancel_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        if job.raw_status == "cancel_requested":  # already cancelling (the SDK's CLI refuses to ask again)
            return (yield from self.refresh_steps(job))
        return (yield from super().cancel_steps(job))

    # -- translation ------------------------------------------------------------------------------------------
    def to_state(self, raw: Any) -> RemoteState:
        d = as_dict(raw)
        raw_status = d.get("status")
        status = map_status(self.status_map, raw_status)
        result = None
        if status is JobStatus.SUCCEEDED:
            metrics = {k: d[k] for k in ("token_count", "param_count", "total_steps", "epochs_completed",
                                         "early_stopped", "early_stopping_best_step", "early_stopping_best_metric")
                       if d.get(k) is not None}
            result = JobResult(model=d.get("model_output_name"), metrics=metrics)
        return RemoteState(remote_id=d.get("id"), raw_status=raw_status, status=status,
                           error=failure_message(d) if status is JobStatus.FAILED else None,
                           result=result, progress=progress_of(d))

    def to_events(self, raw_events: Any, job: "JobRecord") -> list[JobEvent]:
        return [to_event(e) for e in as_dict(raw_events).get("data") or [] if isinstance(e, dict)]


# -- helpers (pure) -------------------------------------------------------------------------------------------
def as_dict(raw: Any) -> dict[str, Any]:
    """An SDK model (or a plain dict) as the wire JSON: the SDK's own field aliases undone."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    to_dict = getattr(raw, "to_dict", None)
    if callable(to_dict):
        return to_dict(mode="json", warnings=False)
    return raw.model_dump(mode="json", by_alias=True)


def timestamp(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def progress_of(d: dict[str, Any]) -> dict[str, Any]:
    progress: dict[str, Any] = {}
    if d.get("steps_completed") is not None:
        progress["step"] = d["steps_completed"]
    if d.get("total_steps"):
        progress["total_steps"] = d["total_steps"]
    if d.get("epochs_completed") is not None:
        progress["epoch"] = d["epochs_completed"]
    if d.get("queue_depth") is not None:
        progress["queue_depth"] = d["queue_depth"]
    eta = d.get("progress") or {}
    if eta.get("estimate_available") and eta.get("seconds_remaining") is not None:
        progress["eta_s"] = eta["seconds_remaining"]
    return progress


def failure_message(d: dict[str, Any]) -> str:
    """Together has no error field on a job: the reason is the message of its last error event."""
    status = d.get("status")
    for event in reversed(d.get("events") or []):
        if not isinstance(event, dict):
            continue
        kind = str(event.get("type") or "").lower()
        level = str(event.get("level") or "").lower()
        if (kind in _ERROR_EVENTS or level.endswith("error")) and event.get("message"):
            return f"{status}: {event['message']}"
    return f"Together reports status {status!r} without a message; see `tunekit jobs events`"


def to_event(e: dict[str, Any]) -> JobEvent:
    kind = str(e.get("type") or "message").lower()
    message = str(e.get("message") or kind)
    created = timestamp(e.get("created_at"))
    level = _LEVELS.get(str(e.get("level") or "info").lower().removeprefix("legacy_"), "info")
    if kind in _ERROR_EVENTS:
        level = "error"
    remote_id = e.get("hash") or hashlib.sha256(f"{e.get('created_at')}|{kind}|{message}".encode()).hexdigest()[:24]
    data = {k: e[k] for k in _EVENT_DATA if e.get(k) not in (None, "")}
    return JobEvent(created_at=created if created is not None else 0.0, level=level,  # type: ignore[arg-type]
                    type=kind, message=message, data=data, remote_id=str(remote_id))


def to_checkpoints(raw: Any) -> list[dict[str, Any]]:
    return [dict(c) for c in as_dict(raw).get("data") or [] if isinstance(c, dict)]


def tagged_items(listed: Any, job_id: str) -> list[dict[str, Any]]:
    """The listed jobs tagged with ``job_id``, earliest first."""
    items = [as_dict(item) for item in as_dict(listed).get("data") or []]
    tagged = [item for item in items if mapping.carries_tag(item, job_id)]
    return sorted(tagged, key=lambda item: timestamp(item.get("created_at")) or 0.0)
