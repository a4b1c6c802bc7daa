"""Fireworks AI backend through the official ``fireworks-ai`` SDK (ManagedBackend hooks).

- Data: converted to the row kind Fireworks takes (chat for SFT, preference for DPO), uploaded as a
  Fireworks dataset (see ``upload.py``).
- Jobs: SFT on ``supervisedFineTuningJobs``, DPO on ``dpoJobs``, each created with a client-chosen job id
  derived from the tunekit id: a repeated create gets 409 ALREADY_EXISTS and ``create_once`` reads the
  job back (natural idempotency). The remote id is the job's resource name
  (``accounts/<a>/supervisedFineTuningJobs/<id>``), so later calls know the account and the kind.
- Fireworks has no events endpoint: events come from polling, by comparing each poll with the stored
  ``raw_status`` / progress.
- The result is ``outputModel``; Fireworks models must be deployed before inference.
"""

from __future__ import annotations

import copy
import tempfile
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..._exceptions import ConfigError, JobStateError
from ..._settings import env_credential
from ...schemas.job import JobEvent, JobResult, JobStatus, Plan, RemoteState, map_status
from ...schemas.spec import TrainingSpec
from .._managed import Call, ManagedBackend, Steps
from ..base import PlanContext, Rule
from . import mapping as m
from .upload import UploadSettings, upload_dataset

if TYPE_CHECKING:
    from ...store import JobRecord

COLLECTIONS = {"sft": "supervisedFineTuningJobs", "dpo": "dpoJobs"}


def _method(job: "JobRecord") -> str:
    return (job.spec or {}).get("method") or "sft"


def parse_name(remote_id: str | None) -> tuple[str, str, str]:
    """``accounts/<a>/<collection>/<id>`` -> (account, method, id)."""
    if not remote_id:
        raise JobStateError("the job has no Fireworks id yet (submit outcome unknown?)",
                            hint="run `tunekit jobs reconcile <job id>` to find it on Fireworks")
    parts = remote_id.split("/")
    if len(parts) != 4 or parts[0] != "accounts" or parts[2] not in COLLECTIONS.values():
        raise ConfigError(f"not a Fireworks job name: {remote_id!r}", field="remote_id")
    method = "dpo" if parts[2] == "dpoJobs" else "sft"
    return parts[1], method, parts[3]


def _resource(client: Any, method: str) -> Any:
    return client.dpo_jobs if method == "dpo" else client.supervised_fine_tuning_jobs


def wire_name(name: str, hint: Any) -> str:
    """The JSON name of a TypedDict field: its ``PropertyInfo(alias=...)``, under any Required[...]."""
    while str(typing.get_origin(hint)).endswith("Required"):  # Required / NotRequired
        hint = typing.get_args(hint)[0]
    for meta in getattr(hint, "__metadata__", ()):
        if getattr(meta, "alias", None):
            return meta.alias
    return name


def sdk_kwargs(body: dict[str, Any], params_type: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wire (camelCase) body -> the SDK method's snake_case keyword arguments, plus keys the SDK does not
    know (sent as ``extra_body``). Nested objects stay in wire form: the SDK passes unknown keys through."""
    by_alias = {wire_name(name, hint): name
                for name, hint in typing.get_type_hints(params_type, include_extras=True).items()}
    kwargs, extra = {}, {}
    for key, value in body.items():
        if key in by_alias:
            kwargs[by_alias[key]] = value
        else:
            extra[key] = value
    return kwargs, extra


class FireworksBackend(ManagedBackend):
    name = "fireworks"
    field_map = m.FIELD_MAP
    options_model = m.FireworksOptions
    options_doc = "docs/backends/fireworks.md"
    status_map = m.STATUS_MAP
    min_rows = 3
    api_key_env = ("FIREWORKS_API_KEY",)
    sdk_module = "fireworks"
    client_chosen_ids = True
    base_url_env = ("FIREWORKS_BASE_URL",)
    account_env: ClassVar[tuple[str, ...]] = ("FIREWORKS_ACCOUNT_ID",)

    def __init__(self, *, account_id: str | None = None,
                 dataset_poll_interval: float = UploadSettings.poll_interval,
                 dataset_timeout: float = UploadSettings.ready_timeout, upload_limit: int = UploadSettings.upload_limit,
                 upload_timeout: float = UploadSettings.upload_timeout, **options: Any) -> None:
        super().__init__(**options)
        self._account_id = account_id
        self.upload_settings = UploadSettings(upload_limit=upload_limit, upload_timeout=upload_timeout,
                                              poll_interval=dataset_poll_interval, ready_timeout=dataset_timeout)
        self._pending: dict[str, list[JobEvent]] = {}

    # -- credentials and clients ---------------------------------------------------------------------
    @property
    def account_id(self) -> str:
        account = self._account_id or env_credential(*self.account_env)
        if not account:
            raise ConfigError("no Fireworks account id", field="account_id",
                              hint="set FIREWORKS_ACCOUNT_ID (the <account> of accounts/<account>/...; see "
                                   "`firectl whoami` or the dashboard) or pass backend_options={'account_id': ...}")
        return account

    def make_client(self, *, async_: bool) -> Any:
        from fireworks import AsyncFireworks, Fireworks

        cls = AsyncFireworks if async_ else Fireworks
        return cls(api_key=self.api_key, account_id=self.account_id, base_url=self.base_url, max_retries=0)

    def poll_interval(self, job: "JobRecord") -> tuple[float, float]:
        return (5.0, 60.0)

    # -- planning --------------------------------------------------------------------------------------
    def base_request(self, spec: TrainingSpec, ctx: PlanContext) -> dict[str, Any]:
        if ctx.rows is not None:
            epochs = spec.hyperparameters.epochs
            if ctx.rows > m.MAX_EXAMPLES or ctx.rows * epochs > m.MAX_EXAMPLES:
                raise ConfigError(
                    f"Fireworks allows at most {m.MAX_EXAMPLES:,} examples x epochs per job "
                    f"(got {ctx.rows:,} rows x {epochs} epochs)", field="hyperparameters.epochs",
                    hint="use fewer epochs or split the data")
        if m.is_dpo(spec):
            # Always explicit: the SDK docs disagree on the default loss (DPO vs GRPO).
            return {"dataset": m.TRAIN_DATASET, "trainingConfig": {}, "lossConfig": {"method": "DPO"}}
        return {"dataset": m.TRAIN_DATASET}

    def plan_notes(self, spec: TrainingSpec, ctx: PlanContext) -> list[str]:
        notes = [f"endpoint: {m.ENDPOINTS[spec.method]}", m.DEPLOY_NOTE + "."]
        if not m.is_dpo(spec) and spec.validation_data is None:
            notes.append("without validation_data Fireworks may carve an evaluation split out of the training "
                         "data (evalAutoCarveout)")
        return notes

    def _rule_for(self, path: str, spec: TrainingSpec) -> Rule:
        if path.startswith(f"provider_options.{self.name}."):
            refused = m.option_refusal(path.split(".", 2)[2], spec)
            if refused is not None:
                return refused
        return super()._rule_for(path, spec)

    # -- submit ------------------------------------------------------------------------------------------
    def upload_files(self, job: "JobRecord", spec: TrainingSpec) -> dict[str, str]:
        from ...data.convert import convert_file

        kind = "preference" if m.is_dpo(spec) else "chat"
        job_id = m.job_id_for(job.id)
        refs: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="tunekit-fw-") as tmp:
            for split, key in (("train", "dataset"), ("validation", "evaluationDataset")):
                entry = (job.data or {}).get(split)
                if not entry:
                    continue
                path, rows = entry["path"], entry["rows"]
                if entry.get("kind") != kind:  # e.g. prompt/response -> chat, streamed to a temp file
                    converted = str(Path(tmp) / f"{split}.jsonl")
                    rows = convert_file(path, converted, kind)
                    path = converted
                dataset_id = f"{job_id}-{'train' if split == 'train' else 'eval'}"
                refs[key] = upload_dataset(self.call, self.client, dataset_id, path, rows, f"tunekit {job.id} {split}",
                                           account_id=self.account_id, settings=self.upload_settings)
        return refs

    def create_kwargs(self, job: "JobRecord", plan: Plan, files: dict[str, str]) -> dict[str, Any]:
        body = copy.deepcopy(plan.request)
        fill = {"account": self.account_id, "job": m.job_id_for(job.id)}
        for dotted in m.TEMPLATED:
            *parents, last = dotted.split(".")
            holder = body
            for key in parents:
                holder = holder.get(key) or {}
            if isinstance(holder.get(last), str):
                holder[last] = holder[last].format(**fill)
        body.update(files)
        return {"method": _method(job), "job_id": fill["job"], "body": body}

    def _create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        from fireworks.types import dpo_job_create_params as dpo_p
        from fireworks.types import supervised_fine_tuning_job_create_params as sft_p

        if kwargs["method"] == "dpo":
            params, extra = sdk_kwargs(kwargs["body"], dpo_p.DpoJobCreateParams)
            return client.dpo_jobs.create(**params, dpo_job_id=kwargs["job_id"], extra_body=extra or None)
        params, extra = sdk_kwargs(kwargs["body"], sft_p.SupervisedFineTuningJobCreateParams)
        return client.supervised_fine_tuning_jobs.create(**params, supervised_fine_tuning_job_id=kwargs["job_id"],
                                                         extra_body=extra or None)

    def submit(self, job: "JobRecord", spec: TrainingSpec, plan: Plan) -> RemoteState:
        state = super().submit(job, spec, plan)
        self._pending.setdefault(job.id, []).append(JobEvent(
            created_at=time.time(), type="remote", message=f"Fireworks job {state.remote_id} ({state.raw_status})",
            data={"remote_id": state.remote_id, "raw_status": state.raw_status}))
        return state

    # -- the other hooks ---------------------------------------------------------------------------------
    def _retrieve(self, client: Any, remote_id: str) -> Any:
        account, method, job_id = parse_name(remote_id)
        return _resource(client, method).get(job_id, account_id=account)

    def _cancel(self, client: Any, remote_id: str) -> Any:
        account, method, job_id = parse_name(remote_id)
        return _resource(client, method).cancel(job_id, account_id=account, body={})

    def _list_tagged(self, client: Any, job: "JobRecord") -> list[Any]:
        """The job created with the id derived from ``job.id``: Fireworks refuses a second (409), so there is
        never more than one and nothing to cancel."""
        import fireworks

        try:
            return [_resource(client, _method(job)).get(m.job_id_for(job.id), account_id=self.account_id)]
        except fireworks.NotFoundError:
            return []

    def check_credentials(self) -> None:
        super().check_credentials()
        self.account_id  # noqa: B018 - raises ConfigError naming FIREWORKS_ACCOUNT_ID

    def to_state(self, raw: Any) -> RemoteState:
        state = raw.state
        status = map_status(self.status_map, state)
        account, method, job_id = parse_name(raw.name)
        error = None
        if status == JobStatus.FAILED or state in m.DELETED_STATES:
            st = raw.status
            detail = f"{st.code}: {st.message}" if st and st.code and st.message else (st.message if st else None)
            if state in m.DELETED_STATES:
                error = f"the job was deleted on Fireworks ({state})" + (f": {detail}" if detail else "")
            else:
                error = detail or f"Fireworks reported {state} without a message"
        progress: dict[str, Any] = {}
        jp = getattr(raw, "job_progress", None)  # SFT jobs only
        if jp is not None and jp.percent is not None:
            progress["percent"] = jp.percent
        if jp is not None and jp.epoch is not None:
            progress["epoch"] = jp.epoch
        result = None
        if status == JobStatus.SUCCEEDED:
            tc = getattr(raw, "training_config", None)
            model = getattr(raw, "output_model", None) or (tc.output_model if tc else None)
            # "If not specified, the job ID will be used" (SDK docstring).
            result = JobResult(model=model or f"accounts/{account}/models/{job_id}")
        return RemoteState(remote_id=raw.name, raw_status=state, status=status, error=error, result=result,
                           progress=progress)

    # -- events from polling -----------------------------------------------------------------------------
    def _note_changes(self, job: "JobRecord", state: RemoteState) -> None:
        out = self._pending.setdefault(job.id, [])
        now, name = time.time(), state.remote_id
        old, new = job.raw_status, state.raw_status
        if new != old:
            level = "error" if state.status == JobStatus.FAILED else "info"
            msg = f"Fireworks state {old or '-'} -> {new}" + (f": {state.error}" if state.error else "")
            out.append(JobEvent(created_at=now, level=level, type="status", message=msg,
                                data={"raw_status": new, "previous": old},
                                remote_id=f"{name}:{old}->{new}"))
            if new == "JOB_STATE_EARLY_STOPPED":
                out.append(JobEvent(created_at=now, level="warning", type="status",
                                    message="Fireworks stopped the job early (early stopping); the output model "
                                            "holds the weights at the stop", remote_id=f"{name}:early-stopped"))
            if state.status == JobStatus.SUCCEEDED and state.result is not None:
                out.append(JobEvent(created_at=now, type="result", remote_id=f"{name}:result",
                                    message=f"model {state.result.model} ready. {m.DEPLOY_NOTE}",
                                    data={"model": state.result.model}))
        percent = state.progress.get("percent")
        if percent is not None and percent != (job.progress or {}).get("percent"):
            epoch = state.progress.get("epoch")
            out.append(JobEvent(created_at=now, type="progress", message=f"progress {percent}%"
                                + (f" (epoch {epoch})" if epoch is not None else ""),
                                data=dict(state.progress), remote_id=f"{name}:progress:{percent}"))

    def refresh_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        state = yield from super().refresh_steps(job)
        self._note_changes(job, state)
        return state

    def events_steps(self, job: "JobRecord") -> list[JobEvent]:
        return self._pending.pop(job.id, [])

    # -- cancel / resume ---------------------------------------------------------------------------------
    def cancel_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        parse_name(job.remote_id)  # a job that never got an id cannot be cancelled (yet)
        yield Call(self._cancel, (job.remote_id,))  # returns {}: read the job back
        return (yield from self.refresh_steps(job))

    def resume(self, job: "JobRecord") -> RemoteState:
        """``:resume`` (e.g. a job Fireworks paused); the reply is the job itself."""
        account, method, job_id = parse_name(job.remote_id)
        state = self.to_state(self.call(
            lambda c: _resource(c, method).resume(job_id, account_id=account, body={}), self.client))
        self._note_changes(job, state)
        return state

    def find_remote(self, job: "JobRecord") -> RemoteState | None:
        state = super().find_remote(job)
        if state is not None:
            self._note_changes(job, state)
        return state
