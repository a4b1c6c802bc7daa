"""The Backend base class and the plan engine.

A backend declares, for every leaf field of :class:`TrainingSpec`, one rule in ``field_map``:

- ``Send("target.path")``            mapped as is into the request;
- ``Send("target.path", convert=f)`` transformed: ``f(value, ctx)`` is what is sent (shown in the plan);
- ``Send(None, note=...)``            honoured with nothing to send (the value is already what the backend
                                     does, e.g. ``adapter.use_dora=False`` on a plain-LoRA provider);
- ``Refuse("reason")``               unsupported: an error unless the call says warn/ignore;
- a callable ``spec -> rule``        when the decision depends on the spec (e.g. DPO-only fields).

``plan(spec)`` walks only the fields the user set, so defaults never trigger refusals, and returns
the exact request with a disposition per field. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Union

from pydantic import BaseModel, ValidationError

from .._exceptions import ConfigError, JobStateError, UnsupportedFieldError
from ..schemas.job import FieldDisposition, JobEvent, JobStatus, Plan, RemoteState
from ..schemas.spec import Hyperparameters, TrainingSpec

if TYPE_CHECKING:
    from ..store import JobRecord

OnUnsupported = Literal["raise", "warn", "ignore"]


@dataclass(frozen=True)
class Send:
    target: str | Callable[[TrainingSpec], str] | None
    convert: Callable[[Any, "PlanContext"], Any] | None = None
    note: str | None = None


@dataclass(frozen=True)
class Refuse:
    reason: str


Rule = Union[Send, Refuse]
FieldRule = Union[Rule, Callable[[TrainingSpec], Rule]]


@dataclass
class PlanContext:
    """What a conversion may need besides the value: the spec and facts about the data."""

    spec: TrainingSpec
    rows: int | None = None
    row_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
    obj[last] = value


class Backend(ABC):
    """Base class. Subclasses set the class attributes and implement the lifecycle methods."""

    name: ClassVar[str] = "base"
    field_map: ClassVar[dict[str, FieldRule]] = {}
    # provider_options.<name>: one pydantic model (extra="forbid", every field optional with its default,
    # constraints on the fields); each key set is validated through it. None = keys passed through as is.
    options_model: ClassVar[type[BaseModel] | None] = None
    options_doc: ClassVar[str] = "docs/spec.md"  # where the options are documented (named in the hint)
    status_map: ClassVar[dict[str, JobStatus]] = {}
    min_rows: ClassVar[int] = 1
    row_kinds: ClassVar[frozenset[str] | None] = None   # None = every row kind
    max_file_bytes: ClassVar[int | None] = None
    # True when the backend trains each example cut at hyperparameters.max_length (the validator then
    # refuses rows far longer than that, before any training)
    truncates_at_max_length: ClassVar[bool] = False
    # USD limit for this submission (finetune's max_cost); a backend whose provider estimates the price
    # before creating the job checks it there, and leaves its figure in provider_estimate.
    max_cost: float | None = None
    provider_estimate: dict[str, Any] | None = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def __repr__(self) -> str:  # never shows options: they may hold credentials
        return f"<{type(self).__name__} {self.name!r}>"

    # -- data rules --------------------------------------------------------------------------------
    def data_rules(self, spec: TrainingSpec | None = None):
        """The backend's rules for the validator (row kinds, minimum rows, size)."""
        from ..schemas.report import DataRules

        kinds = self.row_kinds
        hints: dict[str, str] = {}
        if spec is not None:
            dpo = self.row_kinds is None or "preference" in self.row_kinds
            if spec.method == "dpo":
                kinds = frozenset({"preference"})
                hints = dict.fromkeys(("chat", "prompt_response"), "method='dpo' trains on preference rows; "
                                      "to train on these rows, set method='sft' (CLI: --set method=sft)")
            else:
                kinds = (kinds or frozenset({"prompt_response", "chat"})) - {"preference"}
                if dpo:
                    hints["preference"] = ("preference rows train with method='dpo': set it in the spec "
                                           "(CLI: finetune --set method=dpo, validate --method dpo)")
        # without a spec, the default max_length: `validate --backend B` then refuses what `finetune` would
        hyper = spec.hyperparameters if spec is not None else Hyperparameters()
        max_tokens = hyper.max_length if self.truncates_at_max_length else None
        return DataRules(backend=self.name, min_rows=self.min_rows, kinds=set(kinds) if kinds else None,
                         max_bytes=self.max_file_bytes, kind_hints=hints, max_tokens=max_tokens)

    # -- planning ----------------------------------------------------------------------------------
    def base_request(self, spec: TrainingSpec, ctx: PlanContext) -> dict[str, Any]:
        """The request skeleton before any user-set field is applied (required fields, defaults)."""
        return {}

    def plan(self, spec: TrainingSpec, *, on_unsupported: OnUnsupported = "raise",
             context: PlanContext | None = None) -> Plan:
        if on_unsupported not in ("raise", "warn", "ignore"):
            raise ConfigError(f"on_unsupported must be raise, warn or ignore, not {on_unsupported!r}",
                              field="on_unsupported")
        ctx = context or PlanContext(spec=spec)
        request = self.base_request(spec, ctx)
        fields: list[FieldDisposition] = []
        for path, value in spec.set_fields().items():
            fields.append(self._decide(path, value, spec, ctx, request))
        plan = Plan(backend=self.name, request=request, fields=fields, notes=self.plan_notes(spec, ctx))
        refused = plan.unsupported
        if refused and on_unsupported == "raise":
            raise UnsupportedFieldError(self.name, refused)
        if refused and on_unsupported == "warn":
            for d in refused:
                warnings.warn(f"{self.name}: {d.field} not sent: {d.reason}", stacklevel=2)
        return plan

    def plan_notes(self, spec: TrainingSpec, ctx: PlanContext) -> list[str]:
        return []

    def _rule_for(self, path: str, spec: TrainingSpec) -> Rule:
        if path.startswith("provider_options."):
            _, backend, key = path.split(".", 2)
            if backend != self.name:
                return Refuse(f"options for backend {backend!r}; this job runs on {self.name!r}")
            model = self.options_model
            if model is None:
                return Send(key, note="provider option, sent as is")
            if key not in model.model_fields:
                return Refuse(f"unknown option for {self.name}; valid: {', '.join(sorted(model.model_fields)) or 'none'}")
            return Send(key, convert=lambda value, ctx: self._option_value(key, value), note="provider option")
        rule = self.field_map.get(path)
        if rule is None:
            return Refuse(f"{self.name} has no mapping for this field")
        return rule(spec) if callable(rule) and not isinstance(rule, (Send, Refuse)) else rule

    # -- provider options --------------------------------------------------------------------------
    @classmethod
    def provider_options(cls, spec: TrainingSpec) -> BaseModel | None:
        """The validated ``provider_options.<name>``, defaults filled (None when the backend declares no model).
        Keys the model does not know are left out: the plan has refused them (or was told to ignore them)."""
        if cls.options_model is None:
            return None
        raw = (spec.provider_options or {}).get(cls.name) or {}
        known = {k: v for k, v in raw.items() if k in cls.options_model.model_fields}
        try:
            return cls.options_model.model_validate(known)
        except ValidationError as exc:
            key = str(exc.errors()[0]["loc"][0])
            raise cls._option_error(key, known.get(key), exc) from None

    @classmethod
    def _option_value(cls, key: str, value: Any) -> Any:
        """One option's value as the model validates it (JSON-ready: it goes into the plan's request)."""
        assert cls.options_model is not None
        try:
            checked = cls.options_model.model_validate({key: value})
        except ValidationError as exc:
            raise cls._option_error(key, value, exc) from None
        return checked.model_dump(mode="json", include={key})[key]

    @classmethod
    def _option_error(cls, key: str, value: Any, exc: ValidationError) -> ConfigError:
        # pydantic reports a union once per member ("a valid integer", "less than 1"): every reason, once
        reasons = dict.fromkeys(e["msg"].removeprefix("Input ").removeprefix("String ") for e in exc.errors())
        field_info = cls.options_model.model_fields.get(key) if cls.options_model else None
        meaning = f"{key}: {field_info.description}; " if field_info and field_info.description else ""
        path = f"provider_options.{cls.name}.{key}"
        return ConfigError(f"{path}={value!r} refused: it {', or '.join(reasons)}", field=path,
                           hint=f"{meaning}fix the value in provider_options.{cls.name} (every option: {cls.options_doc})")

    def _decide(self, path: str, value: Any, spec: TrainingSpec, ctx: PlanContext,
                request: dict[str, Any]) -> FieldDisposition:
        rule = self._rule_for(path, spec)
        if isinstance(rule, Refuse):
            return FieldDisposition(field=path, value=value, disposition="unsupported", reason=rule.reason)
        target = rule.target(spec) if callable(rule.target) else rule.target
        sent = rule.convert(value, ctx) if rule.convert else value
        if target is None:
            sent = None  # honoured, nothing goes into the request
        else:
            set_path(request, target, sent)
        kind = "transformed" if rule.convert else "mapped"
        return FieldDisposition(field=path, value=value, disposition=kind, target=target, sent=sent,
                                reason=rule.note)

    # -- lifecycle (subclasses implement) ------------------------------------------------------------
    @abstractmethod
    def submit(self, job: "JobRecord", spec: TrainingSpec, plan: Plan) -> RemoteState:
        """Upload the data and create the job. The store row already exists (job.id)."""

    @abstractmethod
    def refresh(self, job: "JobRecord") -> RemoteState:
        """The job's current state at the backend."""

    @abstractmethod
    def cancel(self, job: "JobRecord") -> RemoteState:
        """Ask the backend to stop the job."""

    def events(self, job: "JobRecord") -> list[JobEvent]:
        """New provider events (the store de-duplicates by ``remote_id``)."""
        return []

    def check_credentials(self) -> None:
        """Raise when a credential the backend needs is missing (checked before a job row is written)."""

    def find_remote(self, job: "JobRecord") -> RemoteState | None:
        """Look for a remote job tagged with ``job.id`` (reconcile after a crash); None if none."""
        return None

    def resume(self, job: "JobRecord") -> RemoteState:
        raise JobStateError(f"backend {self.name!r} cannot resume jobs")

    # -- async twins: the default runs the sync call in a thread; SDK backends override ---------------
    async def arefresh(self, job: "JobRecord") -> RemoteState:
        return await asyncio.to_thread(self.refresh, job)

    async def acancel(self, job: "JobRecord") -> RemoteState:
        return await asyncio.to_thread(self.cancel, job)

    async def aevents(self, job: "JobRecord") -> list[JobEvent]:
        return await asyncio.to_thread(self.events, job)

    def poll_interval(self, job: "JobRecord") -> tuple[float, float]:
        """(first, max) seconds between polls in ``wait``: managed jobs are slow, local ones fast."""
        return (2.0, 30.0)
