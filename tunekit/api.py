"""The public entry points: finetune, validate, plan, get_job, list_jobs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from ._exceptions import (APIConnectionError, APIError, ConfigError, DataValidationError, JobNotFoundError,
                          ServerError, TunekitError)
from .job import FineTuneJob
from .schemas.job import JobStatus, Plan
from .schemas.spec import TrainingSpec
from .store import Store, default_store

if TYPE_CHECKING:
    from .cost import CostEstimate
    from .schemas.report import ValidationReport

log = logging.getLogger(__name__)


def load_spec(source: str | Path | dict[str, Any] | TrainingSpec, **overrides: Any) -> TrainingSpec:
    """A TrainingSpec from a spec, a dict, or a JSON/YAML file; ``overrides`` are top-level fields."""
    if isinstance(source, TrainingSpec):
        data = source.model_dump(exclude_unset=True)
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"spec file not found: {path}", field="spec",
                              hint="check the path; a spec is a JSON or YAML object of TrainingSpec fields "
                                   "(docs/spec.md)")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError as exc:
                    raise ConfigError("reading a YAML spec needs pyyaml", field="spec",
                                      hint="pip install pyyaml, or write the spec as JSON") from exc
                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except (ValueError, Exception) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{path}: not a valid spec file: {exc}", field="spec",
                              hint="save it as UTF-8 JSON or YAML (docs/spec.md)") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the spec is a {type(data).__name__}, not an object of fields", field="spec",
                              hint='write it as one object, e.g. {"base_model": "...", "hyperparameters": '
                                   '{"epochs": 2}} (docs/spec.md)')
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build_spec(data)


def _build_spec(data: dict[str, Any]) -> TrainingSpec:
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = f"spec field {field!r}: {err['msg']}"
        from .schemas.spec import field_range

        allowed = field_range(field)
        if allowed:  # numbers: the value given and the range allowed (one line, value shortened)
            value = repr(err.get("input"))
            msg = (f"spec field {field!r} = {value if len(value) <= 40 else value[:37] + '...'}: "
                   f"{err['msg']} (allowed: {allowed})")
        if err["type"] == "extra_forbidden":
            import difflib

            from .schemas.spec import spec_leaf_fields

            names = spec_leaf_fields() + [p.split(".")[0] for p in spec_leaf_fields()]
            close = difflib.get_close_matches(str(err["loc"][-1]), {n.split(".")[-1] for n in names}, n=1)
            msg = f"unknown spec field {field!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        raise ConfigError(msg, field=field, hint="see docs/spec.md for every field") from exc


def validate(path: str | Path, backend: str | None = None, *, spec: TrainingSpec | None = None,
             tokenizer: Any = None, max_problems: int = 100) -> "ValidationReport":
    """Validate a JSONL file, with the backend's rules (row kinds, minimum rows) when one is named."""
    from .data import validate as _validate

    rules = None
    if backend is not None:
        from .backends import get_backend_class

        rules = get_backend_class(backend)().data_rules(spec)
    return _validate(path, rules=rules, tokenizer=tokenizer, max_problems=max_problems)


def plan(spec: TrainingSpec | dict[str, Any] | str | Path, backend: str, *, on_unsupported: str = "raise",
         rows: int | None = None, **backend_options: Any) -> Plan:
    from .backends import get_backend
    from .backends.base import PlanContext

    spec = load_spec(spec)
    b = get_backend(backend, **backend_options)
    return b.plan(spec, on_unsupported=on_unsupported, context=PlanContext(spec=spec, rows=rows))  # type: ignore[arg-type]


def _validate_command(path: str | Path, backend: str, spec: TrainingSpec, rules: Any) -> str:
    """The `tunekit validate` line that checks a file against the same rules as this run."""
    import shlex

    words = ["tunekit", "validate", str(path), "--backend", backend, "--method", spec.method]
    if rules.max_tokens:
        words += ["--max-length", str(rules.max_tokens)]
    return shlex.join(words)


def finetune(
    data: str | Path,
    spec: TrainingSpec | dict[str, Any] | str | Path | None = None,
    *,
    backend: str = "local",
    base_model: str | None = None,
    validation_data: str | Path | None = None,
    on_unsupported: str = "raise",
    api_key: str | None = None,
    base_url: str | None = None,
    backend_options: dict[str, Any] | None = None,
    store: Store | None = None,
    max_cost: float | None = None,
    on_cost: Callable[["CostEstimate"], None] | None = None,
    **spec_fields: Any,
) -> FineTuneJob:
    """Validate the data, plan the spec on the backend, estimate the cost, record the job, then submit it.

    ``spec_fields`` are TrainingSpec fields (``hyperparameters={...}``, ``adapter={...}``, ``method=``...).
    ``api_key``/``base_url`` go to the backend for this call only and are never stored.
    ``on_cost`` receives the cost estimate before anything is uploaded; above ``max_cost`` (USD) the job is
    refused then (ConfigError, no job recorded). A provider's own estimate, where it makes one before its
    create (Together), is checked against ``max_cost`` too and recorded as a job event.
    """
    from .backends import get_backend
    from .backends.base import PlanContext

    options = dict(backend_options or {})
    if api_key is not None:
        options["api_key"] = api_key
    if base_url is not None:
        options["base_url"] = base_url
    b = get_backend(backend, **options)
    spec_obj = load_spec(spec if spec is not None else {}, base_model=base_model,
                         validation_data=str(validation_data) if validation_data else None, **spec_fields)

    from .data import data_entry, validate as _validate

    rules = b.data_rules(spec_obj)
    report = _validate(data, rules=rules)
    if not report.valid:
        raise DataValidationError(report, command=_validate_command(data, b.name, spec_obj, rules))
    entries = {"train": data_entry(report)}
    if spec_obj.validation_data:
        vreport = _validate(spec_obj.validation_data, rules=rules.model_copy(update={"min_rows": 1}))
        if not vreport.valid:
            raise DataValidationError(vreport, command=_validate_command(spec_obj.validation_data, b.name,
                                                                         spec_obj, rules))
        if report.kind != vreport.kind:
            raise ConfigError(f"validation data holds {vreport.kind} rows but training data holds {report.kind}",
                              field="validation_data")
        entries["validation"] = data_entry(vreport)

    ctx = PlanContext(spec=spec_obj, rows=report.rows, row_kind=report.kind.value if report.kind else None)
    the_plan = b.plan(spec_obj, on_unsupported=on_unsupported, context=ctx)  # type: ignore[arg-type]
    from . import cost

    estimate = cost.estimate(b.name, spec_obj, the_plan, report)
    if on_cost is not None:
        on_cost(estimate)
    cost.check_limit(estimate, max_cost)
    b.max_cost = max_cost

    b.check_credentials()  # a missing key fails here, before a job row exists
    store = store or default_store()
    # The row exists before any remote call, so a crash can always be reconciled.
    record = store.create_job(b.name, spec_obj.model_dump(mode="json", exclude_unset=True), entries,
                              request=the_plan.request)
    store.add_event(record.id, _event(estimate.line(), type="cost_estimate", data=estimate.to_dict()))
    job = FineTuneJob(record, store=store, backend=b)
    try:
        state = b.submit(record, spec_obj, the_plan)
    except (APIConnectionError, ServerError) as exc:
        # Ambiguous: the provider may have created the job. Keep it reconcilable, never guess.
        store.update_job(record.id, status=JobStatus.UNKNOWN,
                         error=f"submit outcome unknown ({exc}); run `tunekit jobs reconcile {record.id}`")
        raise
    except APIError as exc:
        store.update_job(record.id, status=JobStatus.FAILED, error=str(exc))
        raise
    except Exception as exc:
        store.update_job(record.id, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if b.provider_estimate:  # the provider's own figure, next to tunekit's
            usd = b.provider_estimate.get("estimated_total_price")
            figure = cost.usd(usd) if isinstance(usd, (int, float)) else "no price given"
            store.add_event(record.id, _event(f"{b.name}'s estimate: {figure}", type="cost_estimate",
                                              data={"provider": b.provider_estimate}))
    return job.apply(state)


def import_openai(job_ids: list[str] | tuple[str, ...] = (), *, all_jobs: bool = False, api_key: str | None = None,
                  base_url: str | None = None, backend_options: dict[str, Any] | None = None,
                  store: Store | None = None) -> list[FineTuneJob]:
    """Record OpenAI fine-tuning jobs (``ftjob-...``, or every job with ``all_jobs``) as tunekit jobs: status,
    spec, events, metrics, data files kept under ``$TUNEKIT_HOME/imports/openai`` and the result model in the
    adapter registry. Importing a job again updates it; it is never duplicated."""
    from .backends import get_backend
    from .backends.openai.importer import import_jobs

    options = dict(backend_options or {})
    options.update({k: v for k, v in (("api_key", api_key), ("base_url", base_url)) if v is not None})
    return import_jobs(get_backend("openai", **options), job_ids, all_jobs=all_jobs, store=store)


def source_of(job_id: str, *, store: Store | None = None) -> tuple[Path, dict[str, Any]]:
    """The training file and spec of a recorded job, checked against the sha256 recorded with it."""
    from .data import validate as _validate

    record = (store or default_store()).get_job(job_id)
    source = (record.data or {}).get("source", {})
    if source.get("method") not in (None, "supervised", "dpo"):
        raise ConfigError(f"job {record.id} used {source['provider']}'s {source['method']!r} method, which no other "
                          "backend offers", field="from")
    train = (record.data or {}).get("train") or {}
    if train.get("missing") or not train.get("path"):
        raise ConfigError(f"job {record.id} has no training data on this machine (its file "
                          f"{train.get('provider_file')} was deleted at the provider)", field="from",
                          hint="build one from the model's answers with `tunekit distill`, then run "
                               "`tunekit finetune DATA --backend B --base-model M`")
    path = Path(train["path"])
    report = _validate(path) if path.is_file() else None
    if report is None or report.sha256 != train.get("sha256"):
        raise ConfigError(f"{path}: the training file of job {record.id} is missing or changed since it was recorded "
                          f"(sha256 {train.get('sha256')})", field="from",
                          hint="restore the file, or start from the data you have with `tunekit finetune DATA ...`")
    return path, dict(record.spec)


def merge_spec(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied field by field (``{"hyperparameters": {"epochs": 2}}`` keeps the rest)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge_spec(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def finetune_from(job_id: str, *, backend: str, base_model: str | None = None, on_unsupported: str = "raise",
                  store: Store | None = None, **kwargs: Any) -> FineTuneJob:
    """Re-run a recorded job's data and spec on another backend, through the normal plan (fields the new
    backend cannot take, e.g. OpenAI's learning-rate multiplier, are refused unless ``on_unsupported`` says)."""
    path, spec = source_of(job_id, store=store)
    spec = merge_spec(spec, kwargs.pop("spec", None) or {})
    if base_model is not None:
        spec["base_model"] = base_model
    return finetune(path, spec, backend=backend, on_unsupported=on_unsupported, store=store, **kwargs)


def get_job(job_id: str, **backend_options: Any) -> FineTuneJob:
    return FineTuneJob.get(job_id, **backend_options)


def list_jobs(*, backend: str | None = None, status: str | JobStatus | None = None,
              limit: int | None = 50) -> list[FineTuneJob]:
    store = default_store()
    return [FineTuneJob(r, store=store) for r in store.list_jobs(backend=backend, status=status, limit=limit)]


def reconcile(job_id: str | None = None, **backend_options: Any) -> list[FineTuneJob]:
    """Re-attach jobs whose process died between the provider's reply and the store write."""
    from .backends import get_backend

    store = default_store()
    records = [store.get_job(job_id)] if job_id else [
        r for r in store.list_jobs(limit=None)
        if r.remote_id is None and r.status in (JobStatus.CREATED, JobStatus.UNKNOWN)]
    out = []
    for record in records:
        b = get_backend(record.backend, **backend_options)
        job = FineTuneJob(record, store=store, backend=b)
        state = b.find_remote(record)
        if state is not None:
            job.apply(state)
            store.add_event(record.id, _event(f"re-attached to remote job {state.remote_id}"))
        out.append(job)
    return out


@dataclass
class Orphan:
    """A remote job carrying tunekit's tag that no store row owns."""

    backend: str
    job_id: str            # the tunekit id in its tag
    remote_id: str | None
    status: JobStatus
    reason: str
    cancelled: bool = False


def find_orphans(backend: str | None = None, *, cancel: bool = False, **backend_options: Any) -> list[Orphan]:
    """Remote jobs tagged by tunekit that the store does not own: a tag whose job id has no row, or a
    second job with the tag of a row attached to another (a duplicate). ``cancel`` cancels the live ones.

    Looks at ``backend``, else at every managed backend the store has jobs on.
    """
    from .backends import get_backend
    from .backends._managed import ManagedBackend

    store = default_store()
    names = [backend] if backend else sorted({r.backend for r in store.list_jobs(limit=None)} - {"local"})
    out = []
    for name in names:
        b = get_backend(name, **backend_options)
        if not isinstance(b, ManagedBackend):
            continue
        if backend is None:
            try:
                b.check_credentials()
            except TunekitError as exc:  # other backends can still be checked
                log.warning("orphans not looked for on %s: %s (%s)", name, exc, exc.hint)
                continue
        for job_id, state in b.tagged_remote():
            try:
                owner: str | None = store.get_job(job_id).remote_id
            except JobNotFoundError:
                owner, reason = None, "no job with this id in the store"
            else:
                if owner is None or owner == state.remote_id:
                    continue  # its own job (or not attached yet: `reconcile` attaches it)
                reason = f"duplicate of {owner}, which job {job_id} owns"
            orphan = Orphan(name, job_id, state.remote_id, state.status, reason)
            if cancel and not state.status.terminal and state.remote_id:
                orphan.status = b.cancel_remote(state.remote_id).status
                orphan.cancelled = True
                if owner is not None:  # the row's history says what happened to its duplicate
                    store.add_event(job_id, _event(f"cancelled orphan remote job {state.remote_id} ({reason})"))
            out.append(orphan)
    return out


def _event(message: str, *, type: str = "reconcile", data: dict[str, Any] | None = None):
    import time

    from .schemas.job import JobEvent

    return JobEvent(created_at=time.time(), type=type, message=message, data=data or {})


def estimate_cost(data: str | Path, spec: TrainingSpec | dict[str, Any] | str | Path | None = None, *,
                  backend: str, base_model: str | None = None, **backend_options: Any) -> "CostEstimate":
    """The cost estimate ``finetune`` would show, without recording or uploading anything."""
    from . import cost
    from .backends import get_backend
    from .backends.base import PlanContext
    from .data import validate as _validate

    b = get_backend(backend, **backend_options)
    spec_obj = load_spec(spec if spec is not None else {}, base_model=base_model)
    rules = b.data_rules(spec_obj)
    report = _validate(data, rules=rules)
    if not report.valid:
        raise DataValidationError(report, command=_validate_command(data, b.name, spec_obj, rules))
    ctx = PlanContext(spec=spec_obj, rows=report.rows, row_kind=report.kind.value if report.kind else None)
    the_plan = b.plan(spec_obj, on_unsupported="ignore", context=ctx)  # type: ignore[arg-type]
    return cost.estimate(b.name, spec_obj, the_plan, report)
