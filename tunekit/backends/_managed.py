"""What the three managed backends share: credentials, SDK error translation, retries, the
no-duplicate create protocol and the sync/async lifecycle. A provider fills in small hooks; each hook
takes the SDK client and returns what the SDK returns, so the same hook serves the sync client and
(awaited) the async client: the mapping code is shared, never copied.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from abc import abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

from .._exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    RateLimitError,
    ServerError,
    api_error_for_status,
)
from .._retry import RetryPolicy, retry_call, retry_call_async
from .._secrets import mask, mask_exception, mask_logs, register
from .._settings import Secret, env_credential
from ..schemas.job import JobEvent, Plan, RemoteState
from ..schemas.spec import TrainingSpec
from .base import Backend

if TYPE_CHECKING:
    from ..store import JobRecord

# Errors after which a create may or may not have happened on the provider's side.
AMBIGUOUS = (APIConnectionError, ServerError)


def translate_sdk_error(exc: BaseException, provider: str) -> BaseException:
    """Stainless-style SDK exception -> tunekit APIError (the one boundary per backend).

    Works for openai, together and fireworks-ai, which share the generated exception shapes.
    Every known secret a provider echoes is masked, in the new error and in the SDK's (chained to it).
    """
    name = type(exc).__name__
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    if status is None and not ("Connection" in name or "Timeout" in name):
        return exc  # not an SDK API error: let it surface as is
    mask_exception(exc)
    body = getattr(exc, "body", None)
    message = _message(body) or getattr(exc, "message", None) or str(exc) or name
    headers = getattr(response, "headers", None) or {}
    request_id = headers.get("x-request-id") if headers else None
    return api_error_for_status(status, f"{provider}: {mask(message)}", provider=provider, request_id=request_id,
                                body=None, retry_after=_retry_after(headers))


def _message(body: Any) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("message") or inner.get("detail")
        if isinstance(inner, str):
            return inner
        return body.get("message")
    return None


def _retry_after(headers: Any) -> float | None:
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except Exception:  # noqa: BLE001 - a malformed header only loses the hint
        return None


class ManagedBackend(Backend):
    """Base of the OpenAI, Together and Fireworks backends."""

    api_key_env: ClassVar[tuple[str, ...]] = ()
    sdk_module: ClassVar[str] = ""          # the official SDK's package (its loggers are masked)
    # The create carries an id tunekit chose, so the provider refuses a second one (409): one look after
    # an ambiguous failure is enough, and there is never a duplicate to cancel.
    client_chosen_ids: ClassVar[bool] = False
    base_url_env: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None,
                 retry_policy: RetryPolicy | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._api_key = Secret(api_key) if api_key else None
        register(api_key)
        self._base_url = base_url or env_credential(*self.base_url_env) if self.base_url_env else base_url
        self.retry_policy = retry_policy or RetryPolicy.from_env()

    # -- credentials and clients ---------------------------------------------------------------------
    @property
    def api_key(self) -> str:
        key = self._api_key or env_credential(*self.api_key_env)
        if not key:
            raise AuthenticationError(f"no API key for {self.name}", provider=self.name,
                                      hint=f"set {self.api_key_env[0]} or pass api_key=...")
        return str.__str__(key)

    def check_credentials(self) -> None:
        self.api_key  # noqa: B018 - raises AuthenticationError naming the variable to set

    @property
    def base_url(self) -> str | None:
        return self._base_url

    def _new_client(self, *, async_: bool) -> Any:
        # The SDKs log request bodies at DEBUG (a W&B key among them): mask what they and we log.
        mask_logs(f"{self.sdk_module}._base_client", type(self).__module__, __name__)
        return self.make_client(async_=async_)

    @cached_property
    def client(self) -> Any:
        return self._new_client(async_=False)

    @property
    def aclient(self) -> Any:
        """The async client of the running event loop. An httpx AsyncClient's pooled connections belong to
        the loop that opened them, so a second ``asyncio.run(...)`` gets a fresh client instead of a broken one."""
        import asyncio

        try:
            loop: Any = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        cached = self.__dict__.get("_aclient_for_loop")
        if cached is None or cached[0] is not loop:
            cached = (loop, self._new_client(async_=True))
            self.__dict__["_aclient_for_loop"] = cached
        return cached[1]

    @abstractmethod
    def make_client(self, *, async_: bool) -> Any:
        """The official SDK client with its own retries off (max_retries=0): tunekit retries once, here."""

    # -- calling the SDK -------------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> BaseException:
        return translate_sdk_error(exc, self.name)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """The one boundary where SDK exceptions become tunekit's (others pass through unchanged)."""
        try:
            yield
        except APIError:
            raise
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    def call(self, fn: Callable[..., Any], *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        def once() -> Any:
            with self._translated():
                return fn(*args, **kwargs)

        return retry_call(once, policy=self.retry_policy, idempotent=idempotent)

    async def acall(self, fn: Callable[..., Any], *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        async def once() -> Any:
            with self._translated():
                result = fn(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

        return await retry_call_async(once, policy=self.retry_policy, idempotent=idempotent)

    # -- hooks a provider implements ----------------------------------------------------------------------
    @abstractmethod
    def upload_files(self, job: "JobRecord", spec: TrainingSpec) -> dict[str, str]:
        """Convert (if needed) and upload training/validation data; return provider file refs,
        e.g. {"training_file": "file-1", "validation_file": "file-2"}, merged into the create request."""

    @abstractmethod
    def create_kwargs(self, job: "JobRecord", plan: Plan, files: dict[str, str]) -> dict[str, Any]:
        """The create call's arguments: the planned request + file refs + the tunekit tag."""

    @abstractmethod
    def _create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        """The SDK's create call (sync or async client), never retried blindly: see create_once."""

    @abstractmethod
    def _retrieve(self, client: Any, remote_id: str) -> Any:
        """The SDK's get-job call."""

    @abstractmethod
    def _cancel(self, client: Any, remote_id: str) -> Any:
        """The SDK's cancel call."""

    @abstractmethod
    def _list_tagged(self, client: Any, job: "JobRecord") -> list[Any]:
        """The remote jobs tagged with ``job.id`` (or created with its client-chosen id), earliest first (sync)."""

    def _find_tagged(self, client: Any, job: "JobRecord") -> Any | None:
        """The earliest remote job tagged with ``job.id``, else None."""
        tagged = self._list_tagged(client, job)
        return tagged[0] if tagged else None

    def tagged_remote(self) -> list[tuple[str, RemoteState]]:
        """(tunekit job id, state) of the account's remote jobs that carry a tunekit tag: what
        ``tunekit jobs reconcile`` compares with the store to find orphans. Empty where a provider
        cannot make duplicates (client-chosen ids)."""
        return []

    def _list_events(self, client: Any, remote_id: str) -> Any:
        return []

    @abstractmethod
    def to_state(self, raw: Any) -> RemoteState:
        """The provider's job object -> RemoteState (status through the provider's total status map)."""

    def to_events(self, raw_events: Any, job: "JobRecord") -> list[JobEvent]:
        return []

    # -- lifecycle ---------------------------------------------------------------------------------------
    def submit(self, job: "JobRecord", spec: TrainingSpec, plan: Plan) -> RemoteState:
        files = self.upload_files(job, spec)
        kwargs = self.create_kwargs(job, plan, files)
        return self.create_once(job, kwargs)

    # The create protocol's clock (a test replaces them on the instance to run the look-up window fast).
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()

    def create_once(self, job: "JobRecord", kwargs: dict[str, Any]) -> RemoteState:
        """Create without ever leaving two paid jobs.

        After an ambiguous failure (dropped connection, 5xx) keep looking for the job tagged with our id
        for ``retry_policy.lookup_window`` seconds (providers list a new job late) before creating again;
        a 409 (client-chosen id already used) means our earlier attempt won. If a second create was
        needed, any other tagged job that shows up then is cancelled at once and recorded as an event.
        """
        policy = self.retry_policy
        attempt, ambiguous = 0, False
        while True:
            attempt += 1
            try:
                created = self.to_state(self.call(self._create, self.client, kwargs, idempotent=False))
            except ConflictError:
                found = self.call(self._find_tagged, self.client, job)
                if found is not None:
                    return self.to_state(found)
                raise
            except AMBIGUOUS as exc:
                ambiguous = True
                found = self._look_for(job)
                if found is not None:
                    return self.to_state(found)
                if attempt >= policy.max_attempts or policy.gives_up(exc):
                    raise
                self.sleep(policy.wait_seconds(attempt, exc))
                continue
            except RateLimitError as exc:  # rejected before anything was created
                if attempt >= policy.max_attempts or policy.gives_up(exc):
                    raise
                self.sleep(policy.wait_seconds(attempt, exc))
                continue
            if not ambiguous or self.client_chosen_ids:
                return created
            return self._cancel_duplicates(job, created)

    def _look_for(self, job: "JobRecord") -> Any | None:
        """The tagged job, looked for with backoff until the look-up window closes (one look at 0 s)."""
        policy = self.retry_policy
        deadline = self.monotonic() + (0.0 if self.client_chosen_ids else policy.lookup_window)
        delay = policy.initial
        while True:
            found = self.call(self._find_tagged, self.client, job)
            left = deadline - self.monotonic()
            if found is not None or left <= 0:
                return found
            self.sleep(min(delay, left))
            delay = min(policy.max_wait, delay * 2)

    def _cancel_duplicates(self, job: "JobRecord", created: RemoteState) -> RemoteState:
        """After a second create: keep the earliest tagged job, cancel every other one now."""
        try:
            states = [self.to_state(raw) for raw in self.call(self._list_tagged, self.client, job)]
        except APIError as exc:  # the job exists: never fail the submit for want of this check
            created.events.append(_event("warning", f"could not check for a duplicate job ({exc}); run "
                                         "`tunekit jobs reconcile` to list tagged jobs no job owns"))
            return created
        if created.remote_id not in {s.remote_id for s in states}:
            states.append(created)  # not listed yet: it is the newest
        keep, extras = states[0], states[1:]
        for extra in extras:
            try:
                self.call(self._cancel, self.client, extra.remote_id)
                keep.events.append(_event("warning", f"cancelled duplicate remote job {extra.remote_id} (a second "
                                          f"create after a lost reply); kept {keep.remote_id}",
                                          duplicate=extra.remote_id, kept=keep.remote_id))
            except APIError as exc:
                keep.events.append(_event("error", f"duplicate remote job {extra.remote_id} could not be cancelled "
                                          f"({exc}); run `tunekit jobs reconcile --cancel-orphans`",
                                          duplicate=extra.remote_id, kept=keep.remote_id))
        return keep

    def refresh(self, job: "JobRecord") -> RemoteState:
        return self.to_state(self.call(self._retrieve, self.client, job.remote_id))

    def cancel(self, job: "JobRecord") -> RemoteState:
        return self.to_state(self.call(self._cancel, self.client, job.remote_id))

    def events(self, job: "JobRecord") -> list[JobEvent]:
        if not job.remote_id:
            return []
        return self.to_events(self.call(self._list_events, self.client, job.remote_id), job)

    def find_remote(self, job: "JobRecord") -> RemoteState | None:
        found = self.call(self._find_tagged, self.client, job)
        return self.to_state(found) if found is not None else None

    def cancel_remote(self, remote_id: str) -> RemoteState:
        """Cancel a remote job no store row owns (an orphan found by reconcile)."""
        return self.to_state(self.call(self._cancel, self.client, remote_id))

    async def arefresh(self, job: "JobRecord") -> RemoteState:
        return self.to_state(await self.acall(self._retrieve, self.aclient, job.remote_id))

    async def acancel(self, job: "JobRecord") -> RemoteState:
        return self.to_state(await self.acall(self._cancel, self.aclient, job.remote_id))

    async def aevents(self, job: "JobRecord") -> list[JobEvent]:
        if not job.remote_id:
            return []
        return self.to_events(await self.acall(self._list_events, self.aclient, job.remote_id), job)


def _event(level: str, message: str, **data: Any) -> JobEvent:
    return JobEvent(created_at=time.time(), level=level, type="duplicate", message=message,  # type: ignore[arg-type]
                    data=data)
