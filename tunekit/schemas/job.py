"""Job status model, results, events and plans: the types every backend returns."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, Field


class JobStatus(str, enum.Enum):
    CREATED = "created"
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def map_status(table: dict[str, JobStatus], raw: str | None) -> JobStatus:
    """Total status map: a value the table does not know becomes UNKNOWN, never a guess."""
    if raw is None:
        return JobStatus.UNKNOWN
    return table.get(raw, JobStatus.UNKNOWN)


class JobResult(BaseModel):
    """What a finished job produced: a provider model id or a local adapter directory."""

    model: str | None = Field(None, description="Provider model id, or the adapter path for local jobs.")
    adapter_path: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = Field(default_factory=list)
    registry_id: str | None = None


class JobEvent(BaseModel):
    created_at: float
    level: Literal["debug", "info", "warning", "error"] = "info"
    type: str = "message"
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    remote_id: str | None = Field(None, description="The provider's event id, for de-duplication.")


class RemoteState(BaseModel):
    """A backend's view of one job, as returned by submit/refresh/cancel."""

    remote_id: str | None = None
    raw_status: str | None = None
    status: JobStatus = JobStatus.UNKNOWN
    error: str | None = None
    result: JobResult | None = None
    progress: dict[str, Any] = Field(default_factory=dict, description="step, total_steps, loss, eta_s ...")
    events: list[JobEvent] = Field(default_factory=list, description="What the backend did on the job's behalf "
                                   "(e.g. cancelled a duplicate), stored with the job.")


Disposition = Literal["mapped", "transformed", "unsupported"]


class FieldDisposition(BaseModel):
    field: str
    value: Any = None
    disposition: Disposition
    target: str | None = Field(None, description="Where it goes in the request (dotted path).")
    sent: Any = None
    reason: str | None = None


class Plan(BaseModel):
    """The exact request a backend would make, and how each set field is honoured."""

    backend: str
    request: dict[str, Any]
    fields: list[FieldDisposition]
    notes: list[str] = Field(default_factory=list)

    @property
    def unsupported(self) -> list[FieldDisposition]:
        return [f for f in self.fields if f.disposition == "unsupported"]
