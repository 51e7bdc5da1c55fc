"""HTTP to one trainer: the only client module that imports aiohttp.

Responsibilities, each in one place:

* **Connections.** Two pooled keep-alive `aiohttp.ClientSession`s per service client,
  created lazily on the running loop: one for submissions and direct calls, one for
  ``retrieve_future`` long-polls. With separate pools, any number of pending
  long-polls can never starve the submissions that would complete them.
* **Headers.** ``X-API-Key``, ``Accept``, ``User-Agent: firetitan/<version>``,
  ``Content-Type`` on bodies, and an ``X-Idempotency-Key`` on every POST that stays
  the same across the retries of one call (the trainer deduplicates retried
  submissions; ordered ones also keep their ``seq_id``, which is inside the body).
* **Retries.** This is the only retrying layer (tenacity): connection errors and
  timeouts, 408, 409, 429 (honouring ``Retry-After``, capped), 5xx and
  ``x-should-retry: true``; exponential backoff with jitter; an overall deadline;
  ``reraise`` so callers see our exception types, never ``tenacity.RetryError``.
  Until the trainer has answered once, a refused connection or an unknown host is
  retried only for ``RetryPolicy.first_contact_deadline`` and then explained (wrong
  URL, trainer not running); afterwards outages are retried patiently. Every retry
  logs one INFO line, and a call retrying for ``warn_after`` one WARNING (`_RetryLog`).
* **Errors.** aiohttp, timeout and JSON errors are translated into
  `firetitan._errors` classes here and chained with ``from``. Error messages carry the
  trainer's ``detail``. Exceptions that hold request headers (aiohttp's
  ``ClientResponseError`` family) are never chained, so the API key cannot ride along.
* **Secrets.** The API key lives in a `_Secret` that masks itself in ``repr`` and
  refuses to be pickled; headers are never logged.

* **Streams.** `Transport.stream` POSTs a request whose answer is server-sent events
  (deployment sampling) and folds the events as they arrive; a stream that ends early
  or reports a transient error is retried whole, with the same headers (so the same
  ``x-request-id``), under an optional `AdaptiveLimit` that backs off on 429/503.

One class serves a trainer and a deployment: a deployment's transport is built with
``bearer=True``, which adds ``Authorization: Bearer`` next to ``X-API-Key`` (its
gateways read either).

TLS certificates are verified (aiohttp's default); nothing here turns that off.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, NoReturn, Protocol, TypeVar

import aiohttp
import attrs
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
)

from firetitan import _wire
from firetitan._concurrency import AdaptiveLimit
from firetitan._config import ClientConfig, RetryPolicy
from firetitan._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    ClientClosedError,
    ClientUsageError,
    status_error_class,
)
from firetitan._read_only import ReadOnly
from firetitan._unpicklable import Unpicklable
from firetitan._version import __version__
from firetitan._wire.endpoints import Endpoint

__all__ = [
    "PROTOBUF",
    "USER_AGENT",
    "Pool",
    "ProtobufBody",
    "StreamFold",
    "Transport",
    "decode_result",
]

log = logging.getLogger("firetitan.transport")

USER_AGENT = f"firetitan/{__version__}"
Pool = Literal["submit", "poll"]
_JSON = "application/json"
#: Statuses that say "too much at once": they shrink an `AdaptiveLimit`.
_OVERLOAD = frozenset({429, 503})
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class StreamFold(Protocol[T_co]):
    """What `Transport.stream` feeds events into (e.g. `_wire.CompletionStream`)."""

    def add(self, event: _wire.SSEEvent) -> None: ...

    def result(self) -> T_co: ...


#: The media type of protobuf results (wire.md §4.7).
PROTOBUF = "application/x-protobuf"


class _Secret(Unpicklable):
    """A string that never shows itself in a repr and cannot be pickled."""

    _unpicklable = "an API key is never pickled"

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _Retry(Exception):
    """Internal carrier: ``error`` may be retried, after at least ``retry_after`` s.

    ``unreachable`` marks a failure to reach anyone at all (connection refused, host
    name not resolved), as opposed to a trainer that answered or timed out.
    """

    def __init__(
        self, error: APIError, retry_after: float | None = None, *, unreachable: bool = False
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after
        self.unreachable = unreachable


class _RetryLog:
    """The log lines of one call's retries: one INFO line per retry, and one WARNING
    once the call has been retrying for ``warn_after`` seconds. Lines name the call and
    the failure's message, never headers or bodies (and so never the key)."""

    __slots__ = ("_method", "_path", "_started", "_warn_after", "_warned")

    def __init__(self, method: str, path: str, started: float, warn_after: float) -> None:
        self._method = method
        self._path = path
        self._started = started
        self._warn_after = warn_after
        self._warned = False

    def retrying(self, attempt: int, delay: float, reason: BaseException | None) -> None:
        method, path = self._method, self._path
        log.info(
            "retrying %s %s (attempt %d) in %.2f s after: %s", method, path, attempt, delay, reason
        )
        elapsed = time.monotonic() - self._started
        if not self._warned and elapsed >= self._warn_after:
            self._warned = True
            log.warning(
                "%s %s has been retrying for %.1f s (%d attempts so far); last failure: %s",
                method,
                path,
                elapsed,
                attempt - 1,
                reason,
            )


@attrs.frozen
class ProtobufBody:
    """An answer the trainer sent as ``application/x-protobuf``: its bytes, unparsed.

    Only success payloads come this way (wire.md §4.7); the caller knows their message.
    """

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


def decode_result(endpoint: Endpoint[T], answer: Any, *, request_id: str | None = None) -> T:
    """``answer`` (a direct answer, or a future's polled result) decoded by
    ``endpoint``'s result codec: the one place where the client reads results.

    Raises:
        APIResponseValidationError: The answer does not fit the codec.
    """
    try:
        return endpoint.result(answer.data if isinstance(answer, ProtobufBody) else answer)
    except ValueError as exc:
        raise APIResponseValidationError(
            f"unreadable {endpoint.name} answer: {exc}",
            body=None if isinstance(answer, ProtobufBody) else answer,
            request_id=request_id,
        ) from exc


class _Request(NamedTuple):
    """One request, as every attempt of it sends it."""

    method: str
    path: str
    data: bytes | None
    headers: Mapping[str, str]
    pool: Pool
    attempt_timeout: float | None


@attrs.frozen
class _Exchange:
    status: int
    headers: Mapping[str, str]  # names in lower case; only kept for error answers
    body: bytes
    protobuf: bool = False


class Transport(Unpicklable):
    """JSON over HTTP to one trainer, with retries; see the module docstring.

    One instance belongs to one service client and is bound to the event loop on which
    it is first used.
    """

    _unpicklable = "a Transport holds live connections and an API key; it cannot be pickled"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        config: ClientConfig,
        *,
        default_headers: Mapping[str, str] | None = None,
        bearer: bool = False,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        # The reference client appends endpoint paths to the base URL, so a trainer
        # may be mounted under any prefix.
        self._base_url = base_url.rstrip("/")
        self._key = _Secret(api_key)
        self._config = config
        self._extra_headers = dict(default_headers or {})
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._rng = random.Random()
        # When connections to the trainer started failing (refused, no route), until the
        # next answer of any kind. See _request: once that lasts a whole retry deadline,
        # further requests get one attempt each instead of a deadline of retries.
        self._unreachable_since: float | None = None
        # Whether the trainer has ever answered this client; until it has, a refused
        # connection fails within RetryPolicy.first_contact_deadline (see _deadline_for).
        self._answered = False
        # Built once: every request copies this dict rather than rebuilding it.
        self._base_headers = {
            **self._extra_headers,
            "X-API-Key": self._key.reveal(),
            **({"Authorization": f"Bearer {self._key.reveal()}"} if bearer else {}),
            "Accept": _JSON,
            "User-Agent": USER_AGENT,
        }
        self._body_headers = {**self._base_headers, "Content-Type": _JSON}
        # Idempotency keys: a random prefix per transport and a counter. Unique across
        # clients and calls like a uuid4, without a system call per request.
        self._key_prefix = f"firetitan-{secrets.token_hex(8)}-"
        self._key_counter = itertools.count(1)
        self._policies: dict[tuple[Pool, bool], RetryPolicy] = {}
        self._timeouts: dict[tuple[Pool, float | None], aiohttp.ClientTimeout] = {}

    # ------------------------------------------------------------------ properties

    base_url: ReadOnly[str] = ReadOnly("_base_url", "The trainer's base URL (no trailing slash).")

    config: ReadOnly[ClientConfig] = ReadOnly("_config", "The client configuration.")

    closed: ReadOnly[bool] = ReadOnly("_closed", "Whether `aclose` was called.")

    loop: ReadOnly[asyncio.AbstractEventLoop | None] = ReadOnly(
        "_loop", "The loop this transport is bound to, once it was first used."
    )

    def __repr__(self) -> str:
        return f"Transport(base_url={self._base_url!r}, closed={self._closed})"

    def name_session(self, session_id: str) -> None:
        """Name the session in every later request (``X-Firetitan-Session-Id``), so that
        the trainer can refuse this session's model ids coming from anyone else."""
        self._base_headers[_wire.SESSION_HEADER] = session_id
        self._body_headers[_wire.SESSION_HEADER] = session_id

    # ------------------------------------------------------------------ lifecycle

    def check_loop(self) -> asyncio.AbstractEventLoop:
        """Return the running loop after checking that this transport may use it.

        Raises:
            ClientClosedError: The transport was closed.
            ClientUsageError: No loop is running, or the transport is bound to another.
        """
        if self._closed:
            raise ClientClosedError("the client was closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ClientUsageError(
                "firetitan async clients must be used from a running event loop"
            ) from None
        if self._loop is not None and self._loop is not loop:
            raise ClientUsageError(
                "this client is bound to another event loop; create one client per loop"
            )
        return loop

    def _session(self, pool: Pool) -> aiohttp.ClientSession:
        loop = self.check_loop()
        if not self._sessions:
            limits, timeouts = self._config.limits, self._config.timeouts
            for name, limit in (
                ("submit", limits.max_connections),
                ("poll", limits.max_poll_connections),
            ):
                connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=60.0)
                self._sessions[name] = aiohttp.ClientSession(
                    connector=connector,
                    timeout=aiohttp.ClientTimeout(
                        total=timeouts.request, sock_connect=timeouts.connect
                    ),
                    raise_for_status=False,
                )
            self._loop = loop
        return self._sessions[pool]

    async def aclose(self) -> None:
        """Close both connection pools. Later requests raise `ClientClosedError`."""
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    # ------------------------------------------------------------------ requests

    async def encode(self, obj: Any, *, offload: bool = False) -> bytes:
        """Serialise a JSON body, in a worker thread when ``offload`` is set.

        Raises:
            ValueError: The object cannot be carried as JSON (a `_wire.WireError`).
        """
        if offload:
            return await asyncio.to_thread(_wire.dumps, obj)
        return _wire.dumps(obj)

    async def post(
        self,
        path: str,
        body: Any,
        *,
        pool: Pool = "submit",
        retry: bool = True,
        attempt_timeout: float | None = None,
        offload: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """POST a JSON body and return the decoded JSON answer.

        Args:
            path: Endpoint path (`firetitan._wire.endpoints`).
            body: A JSON-able object, or bytes already encoded.
            pool: ``"poll"`` for long-polls, ``"submit"`` otherwise.
            retry: False sends exactly one attempt (heartbeats).
            attempt_timeout: Total seconds for one attempt; the pool's default otherwise.
            offload: Encode and decode in a worker thread (large bodies).
            headers: Extra headers.

        Returns:
            The parsed JSON answer; a `ProtobufBody` if the trainer answered protobuf
            (only when ``headers`` asked for it with ``Accept``).

        Raises:
            APIStatusError: The trainer answered 4xx/5xx (after retries, where retried).
            APIConnectionError: The trainer could not be reached (after retries).
            APIResponseValidationError: The answer was not JSON.
        """
        data = body if isinstance(body, bytes) else await self.encode(body, offload=offload)
        # One key for every attempt of this call: a retried submission is recognisable.
        request_headers = self._body_headers.copy()
        request_headers["X-Idempotency-Key"] = f"{self._key_prefix}{next(self._key_counter)}"
        if headers:
            request_headers.update(headers)
        return await self._request(
            "POST",
            path,
            data,
            pool=pool,
            retry=retry,
            attempt_timeout=attempt_timeout,
            offload=offload,
            headers=request_headers,
        )

    async def get(
        self,
        path: str,
        *,
        attempt_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """GET an endpoint and return the decoded JSON answer.

        Args:
            path: Endpoint path, with its query string if any.
            attempt_timeout: Total seconds for one attempt; the pool's default otherwise.
            headers: Extra headers.

        Raises:
            APIStatusError: The trainer answered 4xx/5xx (after retries, where retried).
            APIConnectionError: The trainer could not be reached (after retries).
            APIResponseValidationError: The answer was not JSON.
        """
        return await self._request(
            "GET",
            path,
            None,
            pool="submit",
            retry=True,
            attempt_timeout=attempt_timeout,
            offload=False,
            headers={**self._base_headers, **headers} if headers else self._base_headers,
        )

    async def call(
        self, endpoint: Endpoint[T], body: Any = None, *, path: str | None = None, **options: Any
    ) -> T:
        """Send one request to ``endpoint`` and return its answer, decoded by the
        endpoint's result codec.

        Args:
            endpoint: The endpoint (`firetitan._wire.endpoints`).
            body: The JSON body of a POST or PUT.
            path: The path with its parameters (and query) filled in; the endpoint's
                own path otherwise.
            options: Options of `post` or `get`.

        Raises:
            APIResponseValidationError: The answer does not fit the result codec.
            APIStatusError, APIConnectionError: As for `post` and `get`.
        """
        url = endpoint.path if path is None else path
        if endpoint.method == "POST":
            answer = await self.post(url, body, **options)
        elif endpoint.method == "GET":
            answer = await self.get(url, **options)
        elif endpoint.method == "PUT":
            answer = await self.put(url, body)
        else:
            answer = await self.delete(url)
        return decode_result(endpoint, answer)

    async def put(self, path: str, body: Any) -> Any:
        """PUT a JSON body (a REST update that sets a value, so retried like a GET).

        Raises:
            APIStatusError, APIConnectionError, APIResponseValidationError: As for `get`.
        """
        return await self._request(
            "PUT",
            path,
            await self.encode(body),
            pool="submit",
            retry=True,
            attempt_timeout=None,
            offload=False,
            headers=self._body_headers,
        )

    async def delete(self, path: str) -> Any:
        """DELETE a resource, in one attempt: a retry of a delete that went through
        would answer 404 for a call that succeeded.

        Raises:
            APIStatusError, APIConnectionError, APIResponseValidationError: As for `get`.
        """
        return await self._request(
            "DELETE",
            path,
            None,
            pool="submit",
            retry=False,
            attempt_timeout=None,
            offload=False,
            headers=self._base_headers,
        )

    def _policy(self, pool: Pool, retry: bool) -> RetryPolicy:
        cached = self._policies.get((pool, retry))
        if cached is not None:
            return cached
        policy = self._config.retry
        if not retry:
            policy = attrs.evolve(policy, max_attempts=1)
        elif pool == "poll":
            # A long-poll is idempotent and its future has its own deadline, so a
            # poll is retried until the trainer has been unreachable for the whole
            # retry deadline, however many attempts that takes.
            policy = attrs.evolve(policy, max_attempts=1_000_000)
        self._policies[(pool, retry)] = policy
        return policy

    async def _request(
        self,
        method: str,
        path: str,
        data: bytes | None,
        *,
        pool: Pool,
        retry: bool,
        attempt_timeout: float | None,
        offload: bool,
        headers: Mapping[str, str],
    ) -> Any:
        # The first attempt runs without the retry machinery, which costs tens of
        # microseconds per request even when nothing fails; only a retryable failure
        # hands the remaining attempts to tenacity.
        request = _Request(method, path, data, headers, pool, attempt_timeout)
        started = time.monotonic()
        try:
            exchange = await self._once(request)
            return await self._decode(exchange, method, path, offload)
        except _Retry as first:
            failure = first
        policy = self._policy(pool, retry)
        retries = _RetryLog(method, path, started, policy.warn_after)

        def wait(exc: BaseException | None, retry_number: int) -> float:
            if isinstance(exc, _Retry) and exc.retry_after is not None:
                return min(exc.retry_after, policy.max_retry_after)
            return policy.backoff(retry_number, self._rng.random())

        def out_of_time(exc: BaseException | None, delay: float) -> bool:
            return time.monotonic() - started + delay >= self._deadline_for(policy, exc)

        # The checks tenacity makes after every failed attempt, made here for the first.
        delay = wait(failure, 1)
        if policy.max_attempts <= 1 or out_of_time(failure, delay):
            error = self._final_error(failure, 1, started)
            raise error from error.__cause__
        down = self._unreachable_for()
        if down >= policy.deadline:
            # The trainer has been unreachable for a whole retry deadline already (it
            # died, say): fail now. Otherwise every pending future would wait out a
            # deadline of its own, a few at a time (polls are bounded per model), and
            # a hundred pending futures would take hours to report the failure.
            raise APIConnectionError(
                f"{failure.error.message} (the trainer has been unreachable for "
                f"{down:.0f} s; not retrying)"
            ) from failure.error.__cause__
        retries.retrying(2, delay, failure)
        await asyncio.sleep(delay)
        attempts = 1

        def stop(state: RetryCallState) -> bool:
            # Attempt numbers count from the second attempt of the request.
            exc = state.outcome.exception() if state.outcome else None
            return state.attempt_number + 1 >= policy.max_attempts or out_of_time(
                exc, state.upcoming_sleep
            )

        retrying = AsyncRetrying(
            stop=stop,
            wait=lambda state: wait(
                state.outcome.exception() if state.outcome else None, state.attempt_number + 1
            ),
            retry=retry_if_exception_type(_Retry),
            reraise=True,
            before_sleep=lambda state: retries.retrying(
                state.attempt_number + 2,
                state.next_action.sleep if state.next_action else 0.0,
                state.outcome.exception() if state.outcome else None,
            ),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    exchange = await self._once(request)
                    return await self._decode(exchange, method, path, offload)
        except _Retry as exhausted:
            error = self._final_error(exhausted, attempts, started)
            raise error from error.__cause__
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def stream(
        self,
        path: str,
        body: Any,
        fold: Callable[[], StreamFold[T]],
        *,
        headers: Mapping[str, str] | None = None,
        limit: AdaptiveLimit | None = None,
    ) -> T:
        """POST a JSON body whose answer is a stream of server-sent events, and fold it.

        Each attempt folds into a fresh ``fold()``. An attempt is retried, with the same
        body and headers, after a connection error, a read timeout, a retryable status,
        a stream that ended before its result was complete (`_wire.StreamTruncated`) or
        an error event naming a transient status; never after an answer it cannot read.
        ``limit``, when given, bounds attempts in flight and learns from 429/503.

        Args:
            path: Endpoint path.
            body: A JSON-able object.
            fold: Makes the accumulator of one attempt.
            headers: Extra headers (e.g. ``x-request-id``), the same on every attempt.
            limit: The concurrency limit the attempts share.

        Returns:
            ``fold().result()`` of the attempt that completed.

        Raises:
            APIStatusError: A refusal, or a retryable failure that outlasted the retries.
            APIConnectionError: The server could not be reached (after retries).
            APIResponseValidationError: The stream broke the protocol.
        """
        data = await self.encode(body)
        request_headers = {**self._body_headers, "Accept": "text/event-stream", **(headers or {})}
        policy = self._config.retry
        retries = _RetryLog("POST", path, time.monotonic(), policy.warn_after)
        first_failure: float | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                if limit is None:
                    return await self._stream_once(path, data, request_headers, fold)
                async with limit.slot():
                    result = await self._stream_once(path, data, request_headers, fold)
                limit.succeeded()
                return result
            except _Retry as failure:
                now = time.monotonic()
                first_failure = first_failure or now
                if failure.retry_after is not None:
                    delay = min(failure.retry_after, policy.max_retry_after)
                else:
                    delay = policy.backoff(attempt, self._rng.random())
                error = failure.error
                if (
                    limit is not None
                    and isinstance(error, APIStatusError)
                    and error.status_code in _OVERLOAD
                ):
                    limit.overloaded(delay)
                if attempt >= policy.max_attempts or now - first_failure + delay > policy.deadline:
                    raise error from error.__cause__
                retries.retrying(attempt + 1, delay, failure)
                await asyncio.sleep(delay)

    async def _stream_once(
        self, path: str, data: bytes, headers: Mapping[str, str], fold: Callable[[], StreamFold[T]]
    ) -> T:
        session = self._session("submit")
        timeouts = self._config.timeouts
        # No total limit (a long generation streams for minutes); a silent stream times
        # out after the request timeout.
        timeout = aiohttp.ClientTimeout(sock_connect=timeouts.connect, sock_read=timeouts.request)
        what = f"POST {path}"
        try:
            async with session.post(
                self._base_url + path,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                self._unreachable_since = None
                if response.status >= 300:
                    exchange = _Exchange(
                        response.status,
                        {k.lower(): v for k, v in response.headers.items()},
                        await response.read(),
                    )
                    if response.status < 400:
                        raise APIResponseValidationError(
                            f"{what} answered with a redirect (HTTP {response.status})"
                        )
                    self._raise_status("POST", path, exchange)
                decoder = _wire.SSEDecoder()
                accumulator = fold()
                async for chunk in response.content.iter_any():
                    for event in decoder.feed(chunk):
                        accumulator.add(event)
                return accumulator.result()
        except TimeoutError as exc:
            raise _Retry(_chain(APITimeoutError(f"{what} timed out"), exc)) from None
        except aiohttp.ClientResponseError as exc:
            raise _Retry(APIConnectionError(f"{what} failed: {exc.message}")) from None
        except aiohttp.ClientError as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) and self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
            failed = APIConnectionError(f"{what} failed: {type(exc).__name__}: {exc}")
            raise _Retry(_chain(failed, exc)) from None
        except _wire.StreamTruncated as exc:
            raise _Retry(_chain(APIConnectionError(f"{what}: {exc.reason}"), exc)) from None
        except _wire.UpstreamError as exc:
            cls = status_error_class(exc.status) if exc.status is not None else None
            error = (
                cls(f"{what}: {exc.reason}", status_code=exc.status or 0, body=None)
                if cls is not None
                else APIError(f"{what}: {exc.reason}")
            )
            if exc.transient:
                raise _Retry(_chain(error, exc)) from None
            raise error from exc
        except _wire.WireError as exc:
            raise APIResponseValidationError(f"{what}: {exc}") from exc

    def _unreachable_for(self) -> float:
        """Seconds since connections to the trainer started failing (0 if they work)."""
        since = self._unreachable_since
        return 0.0 if since is None else time.monotonic() - since

    def _deadline_for(self, policy: RetryPolicy, exc: BaseException | None) -> float:
        """The overall retry deadline after failure ``exc``: short while nobody has ever
        answered at the URL (first contact), the patient one otherwise."""
        if isinstance(exc, _Retry) and exc.unreachable and not self._answered:
            return min(policy.deadline, policy.first_contact_deadline)
        return policy.deadline

    def _final_error(self, failure: _Retry, attempts: int, started: float) -> APIError:
        """The error a call raises once it stops retrying ``failure``: its own, or on
        first contact one that says what was tried and what to check."""
        error = failure.error
        if not failure.unreachable or self._answered:
            return error
        cause = error.__cause__
        if isinstance(cause, aiohttp.ClientConnectorDNSError):
            host = getattr(cause, "host", None) or self._base_url
            check = (
                f"check the host name {host!r} in base_url: it did not resolve from this machine"
            )
        else:
            check = (
                "check that base_url is right (scheme, host, port and path prefix) and that "
                "the trainer is running and listening there (`firetitan serve` prints the URL "
                "it serves at)"
            )
        attempts_text = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        first_contact = APIConnectionError(
            f"cannot reach the trainer at {self._base_url}: {error.message} "
            f"({attempts_text} in {time.monotonic() - started:.1f} s); {check}. The first "
            "request of a client gives up after RetryPolicy.first_contact_deadline; once "
            "the trainer has answered, outages are retried patiently."
        )
        return _chain(first_contact, cause) if cause is not None else first_contact

    def _client_timeout(self, pool: Pool, attempt_timeout: float | None) -> aiohttp.ClientTimeout:
        cached = self._timeouts.get((pool, attempt_timeout))
        if cached is not None:
            return cached
        timeouts = self._config.timeouts
        # sock_connect, not connect: waiting for a free pooled connection is normal
        # under load and must not count as a failure to connect.
        if pool == "poll":
            timeout = aiohttp.ClientTimeout(
                total=attempt_timeout,
                sock_connect=timeouts.connect,
                sock_read=timeouts.long_poll_read,
            )
        else:
            timeout = aiohttp.ClientTimeout(
                total=attempt_timeout or timeouts.request, sock_connect=timeouts.connect
            )
        self._timeouts[(pool, attempt_timeout)] = timeout
        return timeout

    async def _once(self, request: _Request) -> _Exchange:
        method, path, data, headers, pool, attempt_timeout = request
        session = self._session(pool)
        url = self._base_url + path
        started = time.monotonic()
        try:
            # Redirects are not followed: a redirect to another host would carry the
            # API key (aiohttp drops only Authorization on a cross-origin redirect).
            async with session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=self._client_timeout(pool, attempt_timeout),
                allow_redirects=False,
            ) as response:
                self._unreachable_since = None  # it answered
                self._answered = True
                body = await response.read()
                status = response.status
                # Headers are only read on errors (Retry-After, x-should-retry).
                exchange = _Exchange(
                    status,
                    {k.lower(): v for k, v in response.headers.items()} if status >= 400 else {},
                    body,
                    response.content_type == PROTOBUF,
                )
        except TimeoutError as exc:
            raise _Retry(_chain(APITimeoutError(f"{method} {path} timed out"), exc)) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            # A certificate that fails verification does not heal on retry: fail now.
            raise APIConnectionError(
                f"{method} {path} failed: TLS certificate not trusted: {exc}"
            ) from exc
        except aiohttp.ClientResponseError as exc:
            # Carries the request headers (and so the key): never chained.
            raise _Retry(APIConnectionError(f"{method} {path} failed: {exc.message}")) from None
        except aiohttp.ClientError as exc:
            unreachable = isinstance(exc, aiohttp.ClientConnectorError)
            if unreachable and self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
            error = APIConnectionError(f"{method} {path} failed: {type(exc).__name__}: {exc}")
            raise _Retry(_chain(error, exc), unreachable=unreachable) from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s -> %d (%d bytes, %.1f ms)",
                method,
                path,
                exchange.status,
                len(exchange.body),
                1e3 * (time.monotonic() - started),
            )
        if exchange.status >= 400:
            self._raise_status(method, path, exchange)
        if 300 <= exchange.status < 400:
            raise APIResponseValidationError(
                f"{method} {path} answered with a redirect (HTTP {exchange.status}); "
                "redirects are not followed, so that the API key only goes to base_url"
            )
        return exchange

    def _raise_status(self, method: str, path: str, exchange: _Exchange) -> NoReturn:
        status = exchange.status
        body: Any
        try:
            body = _wire.loads(exchange.body) if exchange.body else None
        except ValueError:
            body = exchange.body[:500].decode("utf-8", "replace")
        detail = _detail(body) or (body if isinstance(body, str) and body else None)
        message = f"HTTP {status} from {method} {path}"
        if detail:
            message += f": {detail}"
        request_id = body.get("request_id") if isinstance(body, dict) else None
        error = status_error_class(status)(
            message,
            status_code=status,
            body=body,
            request_id=request_id if isinstance(request_id, str) else None,
        )
        should_retry = exchange.headers.get("x-should-retry", "").lower()
        retryable = should_retry == "true" or (
            should_retry != "false" and (status in (408, 409, 429) or status >= 500)
        )
        if retryable:
            raise _Retry(error, _retry_after(exchange.headers))
        raise error

    async def _decode(self, exchange: _Exchange, method: str, path: str, offload: bool) -> Any:
        if exchange.protobuf:
            return ProtobufBody(exchange.body)
        if not exchange.body:
            raise APIResponseValidationError(f"{method} {path} answered with an empty body")
        try:
            if offload or len(exchange.body) > self._config.limits.offload_bytes:
                return await asyncio.to_thread(_wire.loads, exchange.body)
            return _wire.loads(exchange.body)
        except ValueError as exc:
            raise APIResponseValidationError(
                f"{method} {path} answered with a body that is not JSON: {exc}"
            ) from exc


def _chain(error: APIError, cause: BaseException) -> APIError:
    error.__cause__ = cause
    return error


def _detail(body: Any) -> str | None:
    """The trainer's explanation in an error body (wire.md §9.3 shapes)."""
    if not isinstance(body, dict):
        return None
    for key in ("detail", "message"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
        if value:
            return str(value)
    error = body.get("error")
    if isinstance(error, str) and error:
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``Retry-After-Ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        value = when.timestamp() - time.time()
    return value if math.isfinite(value) and value >= 0 else None
