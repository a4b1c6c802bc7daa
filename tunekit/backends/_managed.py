"""What the three managed backends share: credentials, SDK error translation, retries, the
no-duplicate create protocol and the sync/async lifecycle. A provider fills in small hooks; each hook
takes the SDK client and returns what the SDK returns, so the same hook serves the sync client and
(awaited) the async client: the mapping code is shared, never copied.

The lifecycle (refresh, cancel, events) is written once per backend as a *step function*: a generator
that yields each SDK call it needs as a :class:`Call` and gets the result (or the error) back. ``refresh``
drives it on the sync client, ``arefresh`` on the async client of the running loop, so the two cannot drift.
"""

from __future__ import annotations

import inspect
import time
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Iterator, TypeVar, Union

from .._exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    RateLimitError,
    ServerError,
    api_error_for_status,
)
from .._retry import RetryPolicy, poll, retry_call, retry_call_async
from .._secrets import mask, mask_exception, mask_logs, register
from .._settings import Secret, env_credential
from ..schemas.job import JobEvent, Plan, RemoteState
from ..schemas.spec import TrainingSpec
from .base import Backend

if TYPE_CHECKING:
    from ..store import JobRecord

T = TypeVar("T")

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


@contextmanager
def sdk_errors(provider: str, translate: Callable[[BaseException], BaseException] | None = None) -> Iterator[None]:
    """The one boundary where an SDK's exceptions become tunekit's; tunekit's own and any other error
    pass through unchanged (never chained to themselves)."""
    try:
        yield
    except APIError:
        raise
    except Exception as exc:
        translated = translate(exc) if translate else translate_sdk_error(exc, provider)
        if translated is exc:
            raise
        raise translated from exc


def call_sdk(fn: Callable[..., T], *args: Any, provider: str, policy: RetryPolicy | None = None,
             **kwargs: Any) -> T:
    """One idempotent SDK call (a chat completion for distill or eval) under the retry policy, its errors
    translated so the policy can judge them."""
    def once() -> T:
        with sdk_errors(provider):
            return fn(*args, **kwargs)

    return retry_call(once, policy=policy)


@dataclass(frozen=True)
class Call:
    """An SDK call a step function asks for: ``fn(client, *args)``, on the sync or the async client."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


# A lifecycle step function: yields Calls, receives their results, returns T (or returns T at once).
Steps = Union[Generator[Call, Any, T], T]


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

    def call(self, fn: Callable[..., Any], *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        def once() -> Any:
            with sdk_errors(self.name, self._translate):
                return fn(*args, **kwargs)

        return retry_call(once, policy=self.retry_policy, idempotent=idempotent)

    async def acall(self, fn: Callable[..., Any], *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        async def once() -> Any:
            with sdk_errors(self.name, self._translate):
                result = fn(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

        return await retry_call_async(once, policy=self.retry_policy, idempotent=idempotent)

    def run(self, steps: "Steps[T]") -> T:
        """Drive a step function on the sync client: each Call under the retry policy, its result (or
        tunekit error) sent back in."""
        if not inspect.isgenerator(steps):
            return steps
        try:
            call = next(steps)
            while True:
                try:
                    result = self.call(call.fn, self.client, *call.args)
                except Exception as exc:  # the step function decides: catch it or let it rise
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            return done.value

    async def arun(self, steps: "Steps[T]") -> T:
        """:meth:`run` on the async client of the running event loop."""
        if not inspect.isgenerator(steps):
            return steps
        try:
            call = next(steps)
            while True:
                try:
                    result = await self.acall(call.fn, self.aclient, *call.args)
                except Exception as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            return done.value

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
        ambiguous = False

        def attempt() -> tuple[RemoteState, bool]:
            """(state, True when it is a job an earlier attempt made)."""
            nonlocal ambiguous
            try:
                return self.to_state(self.call(self._create, self.client, kwargs, idempotent=False)), False
            except ConflictError:
                found = self.call(self._find_tagged, self.client, job)
                if found is None:
                    raise
            except AMBIGUOUS:
                ambiguous = True
                found = self._look_for(job)
                if found is None:
                    raise
            return self.to_state(found), True

        def retryable(exc: BaseException) -> bool:
            # 429 is refused before anything is made; an ambiguous failure was looked for just above
            return isinstance(exc, (*AMBIGUOUS, RateLimitError)) and not policy.gives_up(exc)

        state, found = retry_call(attempt, policy=policy, retry_if=retryable, sleep=self.sleep)
        if found or not ambiguous or self.client_chosen_ids:
            return state
        return self._cancel_duplicates(job, state)

    def _look_for(self, job: "JobRecord") -> Any | None:
        """The tagged job, looked for with backoff until the look-up window closes (one look at 0 s)."""
        window = 0.0 if self.client_chosen_ids else self.retry_policy.lookup_window
        return poll(lambda: self.call(self._find_tagged, self.client, job), policy=self.retry_policy,
                    window=window, sleep=self.sleep, monotonic=self.monotonic)

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

    # Each step function below is the lifecycle call written once; the public pairs drive it.
    def refresh_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        return self.to_state((yield Call(self._retrieve, (job.remote_id,))))

    def cancel_steps(self, job: "JobRecord") -> "Steps[RemoteState]":
        return self.to_state((yield Call(self._cancel, (job.remote_id,))))

    def events_steps(self, job: "JobRecord") -> "Steps[list[JobEvent]]":
        if not job.remote_id:
            return []
        return self.to_events((yield Call(self._list_events, (job.remote_id,))), job)

    def refresh(self, job: "JobRecord") -> RemoteState:
        return self.run(self.refresh_steps(job))

    async def arefresh(self, job: "JobRecord") -> RemoteState:
        return await self.arun(self.refresh_steps(job))

    def cancel(self, job: "JobRecord") -> RemoteState:
        return self.run(self.cancel_steps(job))

    async def acancel(self, job: "JobRecord") -> RemoteState:
        return await self.arun(self.cancel_steps(job))

    def events(self, job: "JobRecord") -> list[JobEvent]:
        return self.run(self.events_steps(job))

    async def aevents(self, job: "JobRecord") -> list[JobEvent]:
        return await self.arun(self.events_steps(job))

    def find_remote(self, job: "JobRecord") -> RemoteState | None:
        found = self.call(self._find_tagged, self.client, job)
        return self.to_state(found) if found is not None else None

    def cancel_remote(self, remote_id: str) -> RemoteState:
        """Cancel a remote job no store row owns (an orphan found by reconcile)."""
        return self.to_state(self.call(self._cancel, self.client, remote_id))


def _event(level: str, message: str, **data: Any) -> JobEvent:
    return JobEvent(created_at=time.time(), level=level, type="duplicate", message=message,  # type: ignore[arg-type]
                    data=data)
