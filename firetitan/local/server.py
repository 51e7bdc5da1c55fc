"""The local trainer's HTTP face: routes, authentication, body limits, JSON errors.

Serves every endpoint of the endpoint table (`firetitan._wire.endpoints`, routes built
from it, one handler per endpoint name in `TrainerServer.handlers`): wire.md §11, plus
what tinker 0.38 needs (wire.md §12): protobuf ``forward_backward`` bodies (optionally
zstd), protobuf results, ``tinker://`` paths, the sampling endpoints
(``create_sampling_session``, ``asample``, ``get_sampler``), ``dynamic_config`` and
``finish_session``.
Where the two client populations differ, `firetitan.local.tinker.dialect` decides. Handlers
only parse, validate and register work; the executor (``executor.py``) decides when
it runs and ``operations.py`` what it does.

Rules every response follows:

* Every endpoint, ``healthz`` included, requires ``X-API-Key`` (constant-time compare).
* Errors are JSON ``{"detail": "<what, naming the field>", "error_class": ...}`` with
  the right status: 400 malformed body, 401 auth, 404 unknown model/request/session,
  410 expired future or ended session, 413 body too large, 415 unsupported
  ``Content-Encoding``, 422 values that cannot be served, 429 too many pending
  requests, 503 shutting down. Never a traceback: those are logged here at debug level.
* A request that fails validation is refused *before* it is registered, so nothing
  changes on the trainer. An ordered request refused this way is remembered as a hole,
  so the model's queue does not wait for a ``seq_id`` that will never come.
* Semantic problems only detectable while running (shapes against the model, unknown
  checkpoint) fail the request's future with category ``user`` instead (wire.md §5.5).
  So do protobuf forward bodies whose addressing is readable but whose data is not:
  tinker treats a refused forward POST as fatal for the whole training client.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import attrs
from aiohttp import web

from firetitan import _wire
from firetitan._checkpoint_paths import parse_checkpoint_path, validate_name
from firetitan._wire import endpoints
from firetitan.local import access_log
from firetitan.local.checkpoints import CheckpointStore, Kind
from firetitan.local.completions import CompletionQueues
from firetitan.local.config import ServerConfig
from firetitan.local.connections import ConnectionGuard
from firetitan.local.engine import DEFAULT_MAX_TOKENS, Engine, ModelSpec, UserError
from firetitan.local.executor import (
    Encoding,
    ExecutionRecord,
    Executor,
    ExecutorClosedError,
    OverloadedError,
    RequestExpiredError,
    Result,
    Run,
    SequenceLeadError,
    UnknownRequestError,
)
from firetitan.local.external import ExternalRequest, decode_external_request
from firetitan.local.operations import Operations, SampleTicket
from firetitan.local.problems import ErrorDialect, Problem
from firetitan.local.rest import RestApi, RestError, is_download
from firetitan.local.sessions import ModelRecord, Registry, SamplingSession, model_id_for
from firetitan.local.tinker import compat as tinker_compat
from firetitan.local.tinker import dialect
from firetitan.local.tinker import wire as tinker_wire

__all__ = ["TrainerServer"]

log = logging.getLogger("firetitan.local")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# client/config flags. The Fireworks SDK fails client-side if either proto flag is true
# (tinker sends protobuf forward bodies regardless, uncompressed with these flags); no
# JWT exchange. tinker's sampling features are on: one completion poll per sampling
# session (retrieve_futures) and clone ids from the trainer (join_sampling_session).
# tinker uploads the custom losses it traces and the trainer runs them
# (firetitan.local.loss_graphs).
CLIENT_CONFIG_FLAGS = {
    "pjwt_auth_enabled": False,
    "proto_write_fwdbwd": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": True,
    "custom_loss_server_side": True,
    "sample_join_sampling_session": True,
}
#: A graceful stop stops waiting for clients to collect outcomes once no poll has come
#: for this long: a client that polls comes back within milliseconds of an answer.
_POLL_IDLE_SECONDS = 1.0
#: Most datums tinker puts in one forward_backward chunk.
FWDBWD_MAX_CHUNK_LEN = 1024
#: tinker's own default for a chunk's estimated protobuf size.
FWDBWD_MAX_CHUNK_BYTES = 5_000_000


def _bad_request(exc: _wire.WireError) -> Problem:
    if isinstance(exc, tinker_wire.UnsupportedContentEncoding):
        return Problem(415, str(exc), "UnsupportedMediaType")
    return Problem(400, str(exc), "WireError")


def _unprocessable(detail: str) -> Problem:
    return Problem(422, detail, "UnprocessableEntityError")


def _not_found(detail: str) -> Problem:
    return Problem(404, detail, "NotFoundError")


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_wire.dumps(obj), status=status, content_type="application/json")


def _translate(exc: Exception) -> Problem | None:
    """The trainer's own refusals as problems."""
    if isinstance(exc, RestError):
        error_class = "NotFoundError" if exc.status == 404 else "BadRequestError"
        return Problem(exc.status, exc.detail, error_class)
    if isinstance(exc, _wire.WireError):
        return _bad_request(exc)
    if isinstance(exc, ExecutorClosedError):
        return Problem(503, str(exc), "ServiceUnavailable", retry_after=1)
    if isinstance(exc, OverloadedError):
        return Problem(429, str(exc), "RateLimitError", retry_after=1)
    if isinstance(exc, SequenceLeadError):
        return _unprocessable(f"seq_id: {exc}")
    return None


#: Errors as tinker and the Fireworks training SDK read them.
ERRORS = ErrorDialect(
    body=lambda problem: {"detail": problem.message, "error_class": problem.code},
    respond=lambda body, status: json_response(body, status=status),
    timeout_code="RequestTimeoutError",
    too_large_code="RequestTooLargeError",
    too_large=lambda limit: f"request body exceeds the limit of {limit} bytes",
    internal_code="InternalServerError",
    http_code=None,
    translate=_translate,
    log=log,
)


_JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _load_object(raw: bytes) -> dict[str, Any]:
    obj = _wire.loads(raw)
    if not isinstance(obj, dict):
        raise _wire.WireError("", f"the body must be a JSON object, got {_json_type(obj)}")
    return obj


class TrainerServer:
    """The aiohttp application of one local trainer, with its executor and engine.

    Args:
        engine_factory: Builds the engine; called on the engine thread at `start`.
        store: This job's checkpoint store.
        api_key: The key every request must carry in ``X-API-Key``.
        config: Limits and timings.
    """

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        store: CheckpointStore,
        api_key: str,
        config: ServerConfig | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.config = config or ServerConfig()
        self.store = store
        self._engine_factory = engine_factory
        self._key = api_key.encode("utf-8")
        self._executor = Executor(self.config, private_root=store.root)
        self._guard = ConnectionGuard(self.config.connection_limits, log)
        self._registry = Registry()
        self._rest = RestApi(store, self._registry, json_response, self._read)
        self._completions = CompletionQueues()
        self._engine: Engine | None = None
        self._ops: Operations | None = None
        self._capabilities: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self.base_url = ""

    def __repr__(self) -> str:
        return f"TrainerServer(base_url={self.base_url!r}, job_id={self.store.job_id!r})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def engine(self) -> Engine:
        """The running engine (for in-process inspection)."""
        return self._operations.engine

    def pause(self, reason: str) -> None:
        """Start no new request until `resume`; clients polling the waiting ones hear
        queue state ``paused_capacity`` with ``reason``. Call on the server's loop."""
        self._executor.hold("paused_capacity", reason)

    def resume(self) -> None:
        """End a `pause`. Call on the server's loop."""
        self._executor.release()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Build the engine, bind, and serve; return the base URL.

        Raises:
            OSError: The address cannot be bound.
            Exception: Whatever the engine factory raised.
        """
        self._executor.start()
        try:
            self._engine = await self._executor.in_engine(self._engine_factory)
            self._capabilities = await self._executor.in_engine(self._engine.supported_models)
            self._ops = Operations(self._engine, self.store, self._registry, self._executor)
            self._runner, self.base_url = await self._guard.serve(
                self.make_app(),
                host,
                port,
                shutdown_timeout=self.config.shutdown_grace_seconds,
                # Bodies are decompressed by `_read`, under the size limit and with zstd
                # (which aiohttp would refuse with a plain-text 400).
                auto_decompress=False,
            )
        except BaseException:
            await self.close()
            raise
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
        return self.base_url

    async def close(self) -> None:
        """Stop gracefully: refuse new work (503), fail queued work with "the trainer is
        shutting down", finish running work, and keep answering polls until clients
        have collected those outcomes (at most ``shutdown_grace_seconds``, and not once
        polls stop coming); then stop listening, close the engine and connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await self._executor.stop()
            await self._executor.delivered(
                within=self.config.shutdown_grace_seconds, idle=_POLL_IDLE_SECONDS
            )
            await runner.cleanup()  # calls _on_shutdown while handlers can still answer
        await self._shutdown_work()

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self._shutdown_work()

    async def _shutdown_work(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
            self._maintenance = None
        engine = self._engine
        await self._executor.close(final=engine.close if engine is not None else None)

    async def _maintain(self) -> None:
        """Evict old results, end silent sessions, delete expired checkpoints."""
        loop = asyncio.get_running_loop()
        assert self._ops is not None
        while True:
            await asyncio.sleep(self.config.maintenance_interval_seconds)
            now = loop.time()
            self._executor.evict_expired(now)
            expired = self._registry.expired_sessions(now, self.config.session_expiry_seconds)
            for session_id in expired:
                log.info("session %s expired (no heartbeat); unloading its models", session_id)
                self._end_session(session_id, "its session expired (no heartbeat)")
            try:
                removed = await self._executor.in_engine(self._ops.sweep)
            except ExecutorClosedError:
                return
            except Exception:  # a sweep failure must not stop maintenance
                log.debug("checkpoint sweep failed", exc_info=True)
                continue
            if removed:
                log.info("deleted expired checkpoints: %s", ", ".join(removed))

    def _end_session(self, session_id: str, why: str) -> None:
        assert self._ops is not None
        for sampling in list(self._registry.sampling.values()):
            if sampling.session_id == session_id:
                self._completions.forget(sampling.sampling_session_id)
        for model_id in self._registry.end_session(session_id):
            record = self._registry.models.get(model_id)
            if record is None or record.unload_request_id is not None:
                continue
            reason = f"model {model_id!r} was unloaded because {why}"
            try:
                record.unload_request_id = self._executor.submit(
                    "unload_model", self._ops.unload(model_id, reason), model_id=model_id
                )
                record.state = "unloading"
            except (ExecutorClosedError, OverloadedError):
                log.debug("could not unload %s", model_id, exc_info=True)

    # ------------------------------------------------------------------ app

    def make_app(self) -> web.Application:
        """The aiohttp application (middlewares: the connection guard outermost, then
        the access log when it is on, JSON errors, and auth)."""
        errors = ERRORS.middleware(self.config.max_request_bytes)
        middlewares = [errors, self._auth_middleware]
        if self.config.access_log:
            middlewares.insert(0, access_log.middleware)
        app = web.Application(
            middlewares=middlewares,
            client_max_size=self.config.max_request_bytes,
        )
        self._guard.install(app)
        app.on_shutdown.append(self._on_shutdown)
        handlers = self.handlers()
        # GET routes answer GET only (aiohttp would add HEAD to each).
        routes = [
            web.route(
                endpoint.method,
                endpoint.path,
                handlers[endpoint.name],
                **({"allow_head": False} if endpoint.method == "GET" else {}),
            )
            for endpoint in endpoints.TRAINER
            if endpoint is not endpoints.DEBUG_EXECUTION_LOG or self.config.debug_endpoints
        ]
        app.add_routes(routes)
        return app

    def handlers(self) -> dict[str, Handler]:
        """The handler of every endpoint of `endpoints.TRAINER`, by endpoint name."""
        return {
            "client_config": self._client_config,
            "dynamic_config": self._dynamic_config,
            "create_session": self._create_session,
            "session_heartbeat": self._heartbeat,
            "finish_session": self._finish_session,
            "telemetry": self._telemetry,
            "healthz": self._healthz,
            "get_server_capabilities": self._capabilities_handler,
            "create_model": self._create_model,
            "get_info": self._get_info,
            "forward": functools.partial(self._forward, "forward"),
            "forward_backward": functools.partial(self._forward, "forward_backward"),
            "optim_step": self._optim_step,
            "save_weights": self._save_weights,
            "load_weights": self._load_weights,
            "save_weights_for_sampler": self._save_for_sampler,
            "list_checkpoints": self._list_checkpoints,
            "unload_model": self._unload_model,
            "retrieve_future": self._retrieve_future,
            "cancel_future": self._cancel_future,
            "create_sampling_session": self._create_sampling_session,
            "create_custom_loss": self._create_custom_loss,
            "asample": self._asample,
            "get_sampler": self._sampler,
            "retrieve_futures": self._retrieve_futures,
            "join_sampling_session": self._join_sampling_session,
            "save_weights_external": self._save_external,
            "debug_execution_log": self._debug_log,
            **self._rest.handlers(),
        }

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_download(request):
            # Signed download URLs, fetched without the key (`firetitan.local.rest`).
            if not self._rest.signed(request):
                raise Problem(403, "invalid or expired download signature", "PermissionDenied")
            return await handler(request)
        provided = request.headers.get("X-API-Key")
        if provided is None:
            raise Problem(401, "missing X-API-Key header", "AuthenticationError")
        if not hmac.compare_digest(provided.encode("utf-8", "replace"), self._key):
            raise Problem(401, "invalid API key in X-API-Key header", "AuthenticationError")
        length = request.content_length
        if length is not None and length > self.config.max_request_bytes:
            raise self._too_large()  # also on routes that never read their body
        return await handler(request)

    def _too_large(self) -> Problem:
        return ERRORS.too_large_problem(self.config.max_request_bytes)

    # ------------------------------------------------------------------ parsing

    async def _read(self, request: web.Request) -> bytes:
        """The request body, decompressed (``zstd`` or none) under the size limit."""
        length = request.content_length
        limit = self.config.max_request_bytes
        if length is not None and length > limit:
            raise self._too_large()
        raw = await request.read()
        coding = request.headers.get("Content-Encoding")
        if coding is None:
            return raw
        return await self._off_loop(
            len(raw), functools.partial(tinker_wire.decompress_body, max_bytes=limit), raw, coding
        )

    async def _off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """Run a parse/decode step inline for small bodies, on a helper thread for large
        ones (so a big upload never stalls polls and heartbeats)."""
        if size >= self.config.decode_in_thread_bytes:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _object(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        raw = await self._read(request)
        return raw, await self._off_loop(len(raw), _load_object, raw)

    async def _decode(self, endpoint: str, raw: bytes, obj: dict[str, Any]) -> Any:
        # tinker options the codec passes over but the trainer cannot honour (another
        # optimizer, an access token) are refused, not silently ignored.
        tinker_compat.check_tinker_options(endpoint, obj)
        return await self._off_loop(len(raw), _wire.decode_request, endpoint, obj)

    @staticmethod
    def _idempotency_keys(request: web.Request, endpoint: str) -> list[Hashable]:
        key = request.headers.get("X-Idempotency-Key")
        return [("idem", endpoint, key)] if key else []

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    @property
    def _operations(self) -> Operations:
        if self._ops is None:
            raise ExecutorClosedError("the trainer is not started")
        return self._ops

    def _model(self, model_id: str) -> ModelRecord:
        record = self._registry.models.get(model_id)
        if record is None or not self._executor.has_model(model_id):
            raise _not_found(f"model_id: unknown model {model_id!r}")
        if record.state == "unloading":
            raise _not_found(f"model_id: model {model_id!r} is being unloaded")
        return record

    def _store_path(self, path: str, kind: Kind, field: str) -> str:
        """A checkpoint path a client sent (bare name, ``cross_job://`` or ``tinker://``,
        from any client), in the form the checkpoint store resolves.

        Raises:
            Problem: 422 for a malformed path or one of the other kind.
        """
        try:
            converted = tinker_compat.store_path(path, kind=kind, job_id=self.store.job_id)
            parse_checkpoint_path(converted)
        except ValueError as exc:
            raise _unprocessable(f"{field}: {exc}") from None
        return converted

    def _client_path(self, session_id: str, kind: Kind, store_path: str) -> str:
        """A checkpoint path in the style the session's client reads."""
        session_dialect = self._registry.dialect(session_id)
        ref = parse_checkpoint_path(store_path)
        return dialect.checkpoint_path(session_dialect, kind, ref, self.store.job_id)

    def _likely_encoding(self, session_id: str | None) -> Encoding:
        if session_id is None:
            return "json"
        return dialect.likely_encoding(self._registry.dialect(session_id))

    def _session(self, session_id: str) -> None:
        if self._registry.ended(session_id):
            raise Problem(410, f"session_id: session {session_id!r} has ended", "GoneError")
        if not self._registry.touch(session_id, self._now()):
            raise _not_found(f"session_id: unknown session {session_id!r}")

    def _check_owner(self, request: web.Request, model_id: str) -> None:
        """Refuse a request for a model of another session (403), when the sender says
        which session it is (``X-Firetitan-Session-Id``, sent by firetitan's client;
        tinker and the Fireworks SDK name no session, so their requests pass)."""
        sender = request.headers.get(_wire.SESSION_HEADER)
        record = self._registry.models.get(model_id)
        if sender is None or record is None or sender == record.session_id:
            return
        raise Problem(
            403,
            f"model_id: model {model_id!r} belongs to another session than {sender!r}",
            "PermissionDeniedError",
        )

    # ------------------------------------------------------------------ ordered requests

    async def _ordered(
        self,
        endpoint: str,
        request: web.Request,
        address: tuple[str, int] | None,
        decode: Callable[[], Awaitable[Any]],
        build: Callable[[Any, ModelRecord], Run],
    ) -> web.Response:
        """Shared path of every seq_id-ordered POST: dedup, decode, validate, queue.

        Args:
            endpoint: The endpoint, for the execution log.
            request: The HTTP request (for the sender's session).
            address: ``(model_id, seq_id)`` if the body has them (see `_address`).
            decode: Decodes the body (raising `WireError`).
            build: ``build(decoded, record)`` validates what the codec cannot and
                returns the request's work; it raises `Problem` to refuse the request.
        """
        if address is not None:
            access_log.note(model_id=address[0], seq_id=address[1])
            self._check_owner(request, address[0])
            known = self._executor.lookup_seq(*address)
            if known is not None:  # a retry (whatever its body): same id, runs once
                return _ack(known, address[0])
        try:
            decoded = await decode()
            access_log.note(model_id=decoded.model_id, seq_id=decoded.seq_id)
            record = self._model(decoded.model_id)
            self._check_owner(request, record.model_id)
            if decoded.seq_id < 1:
                raise _unprocessable(f"seq_id must be >= 1, got {decoded.seq_id}")
            run = build(decoded, record)
        except (Problem, _wire.WireError) as exc:
            status = exc.status if isinstance(exc, Problem) else 400
            if status in (400, 422) and address is not None:
                self._executor.skip_seq(*address)
            raise
        kind = getattr(decoded, "forward_only", None)
        kind_name = endpoint if kind is None else ("forward" if kind else "forward_backward")
        request_id = self._executor.submit_ordered(decoded.model_id, decoded.seq_id, kind_name, run)
        self._registry.touch_model(decoded.model_id, self._now())
        return _ack(request_id, decoded.model_id)

    async def _ordered_json(
        self,
        endpoint: str,
        request: web.Request,
        build: Callable[[Any, ModelRecord], Run],
    ) -> web.Response:
        raw, obj = await self._object(request)
        decode = functools.partial(self._decode, endpoint, raw, obj)
        return await self._ordered(endpoint, request, _address(obj), decode, build)

    async def _forward(self, endpoint: str, request: web.Request) -> web.Response:
        if dialect.body_is_protobuf(request.headers):
            return await self._forward_protobuf(endpoint, request)
        return await self._ordered_json(endpoint, request, self._forward_work)

    async def _forward_protobuf(self, endpoint: str, request: web.Request) -> web.Response:
        """tinker 0.38's forward and forward_backward: one protobuf message for both,
        ``forward_only`` telling which (and ``/forward`` always a forward pass)."""
        raw = await self._read(request)
        decode = functools.partial(
            tinker_wire.decode_forward_backward_request,
            max_body_bytes=self.config.max_request_bytes,
        )
        try:
            decoded: _wire.ForwardRequest = await self._off_loop(len(raw), decode, raw)
        except tinker_wire.InvalidForwardData as exc:
            return self._fail_in_turn(request, exc)
        if endpoint == "forward" and not decoded.forward_only:
            decoded = attrs.evolve(decoded, forward_only=True)
        address = (decoded.model_id, decoded.seq_id)
        decoded_already = functools.partial(_ready, decoded)
        return await self._ordered(endpoint, request, address, decoded_already, self._forward_work)

    def _forward_work(self, req: _wire.ForwardRequest, record: ModelRecord) -> Run:
        return self._operations.forward(req, record, self._likely_encoding(record.session_id))

    def _fail_in_turn(
        self, request: web.Request, exc: tinker_wire.InvalidForwardData
    ) -> web.Response:
        """Accept a forward call whose data is invalid and fail it in its turn: its
        future fails (category ``user``) and the model's later requests still run."""
        self._check_owner(request, exc.model_id)
        known = self._executor.lookup_seq(exc.model_id, exc.seq_id)
        if known is not None:
            return _ack(known, exc.model_id)
        self._model(exc.model_id)
        message = str(exc)

        async def run() -> Result:
            raise UserError(message)

        kind = "forward" if exc.forward_only else "forward_backward"
        request_id = self._executor.submit_ordered(exc.model_id, exc.seq_id, kind, run)
        self._registry.touch_model(exc.model_id, self._now())
        return _ack(request_id, exc.model_id)

    async def _optim_step(self, request: web.Request) -> web.Response:
        return await self._ordered_json(
            "optim_step", request, lambda req, _rec: self._operations.optim_step(req)
        )

    async def _save_weights(self, request: web.Request) -> web.Response:
        def build(req: _wire.SaveWeightsRequest, record: ModelRecord) -> Run:
            name = _valid_name(req.path, "path")
            returned = self._client_path(record.session_id, "state", name)
            return self._operations.save_weights(req, record, returned)

        return await self._ordered_json("save_weights", request, build)

    async def _save_external(self, request: web.Request) -> web.Response:
        def build(req: ExternalRequest, record: ModelRecord) -> Run:
            name = _valid_name(req.path, "path")
            returned = self._client_path(record.session_id, "external", name)
            return self._operations.save_external(req, record, returned)

        raw, obj = await self._object(request)
        decode = functools.partial(self._off_loop, len(raw), decode_external_request, obj)
        return await self._ordered("save_weights_external", request, _address(obj), decode, build)

    async def _load_weights(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        if obj.get("model_id") is None and obj.get("session_id") is not None:
            req: _wire.LoadWeightsRequest = await self._decode("load_weights", raw, obj)
            return self._create_via_load(req)

        def build(req: _wire.LoadWeightsRequest, _rec: ModelRecord) -> Run:
            return self._operations.load_weights(req, self._store_path(req.path, "state", "path"))

        decode = functools.partial(self._decode, "load_weights", raw, obj)
        return await self._ordered("load_weights", request, _address(obj), decode, build)

    async def _save_for_sampler(self, request: web.Request) -> web.Response:
        def build(req: _wire.SaveWeightsForSamplerRequest, record: ModelRecord) -> Run:
            sampling: SamplingSession | None = None
            if req.path is not None:
                name = _valid_name(req.path, "path")
            elif req.sampling_session_seq_id is not None:
                # tinker's path-less export: a sampling session over an export whose
                # name the trainer picks.
                name = f"sampler-{req.model_id.replace(':', '-')}-{req.seq_id}"
                sampling = self._registry.create_sampling_session(
                    record.session_id, req.sampling_session_seq_id, name, None
                )
            else:
                raise _unprocessable("path: required unless sampling_session_seq_id is given")
            returned = self._client_path(record.session_id, "sampler", name)
            return self._operations.save_for_sampler(
                req, record, name, returned, client_metadata=req.metadata, sampling_session=sampling
            )

        return await self._ordered_json("save_weights_for_sampler", request, build)

    # ------------------------------------------------------------------ models

    async def _create_model(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.CreateModelRequest = await self._decode("create_model", raw, obj)
        self._session(req.session_id)
        model_id = model_id_for(req.session_id, req.model_seq_id)
        known = self._registry.models.get(model_id)
        if known is not None:  # a retry: (session_id, model_seq_id) identifies the call
            return _ack(known.create_request_id, model_id)
        if req.projection_head_dim:
            raise _unprocessable("projection_head_dim: projection heads are not supported here")
        spec = ModelSpec(
            base_model=req.base_model,
            lora_rank=req.lora_rank,
            lora_alpha=req.lora_alpha,
            lora_seed=req.lora_seed,
            train_mlp=req.train_mlp,
            train_attn=req.train_attn,
            train_unembed=req.train_unembed,
            base_only=req.base_only,
        )
        record = ModelRecord(model_id, req.session_id, spec, user_metadata=req.user_metadata)
        return self._add_model(record, "create_model", self._operations.create_model(record))

    def _create_via_load(self, req: _wire.LoadWeightsRequest) -> web.Response:
        """tinker 0.38: ``load_weights`` with ``session_id`` + ``model_seq_id`` and no
        ``model_id`` creates the model ``<session_id>:train:<model_seq_id>`` from a
        checkpoint; its options come from the checkpoint."""
        assert req.session_id is not None and req.model_seq_id is not None
        self._session(req.session_id)
        model_id = model_id_for(req.session_id, req.model_seq_id)
        known = self._registry.models.get(model_id)
        if known is not None:
            return _ack(known.create_request_id, model_id)
        store_path = self._store_path(req.path, "state", "path")
        record = ModelRecord(
            model_id,
            req.session_id,
            ModelSpec(base_model=req.base_model or ""),
            user_metadata=req.user_metadata,
        )
        run = self._operations.create_from_checkpoint(record, req, store_path)
        return self._add_model(record, "load_weights", run)

    def _add_model(self, record: ModelRecord, kind: str, run: Run) -> web.Response:
        record.last_request_time = time.time()
        record.create_request_id = self._executor.add_model(record.model_id, kind, run)
        self._registry.add_model(record)
        return _ack(record.create_request_id, record.model_id)

    async def _get_info(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.GetInfoRequest = await self._decode("get_info", raw, obj)
        record = self._model(req.model_id)
        self._check_owner(request, record.model_id)
        if record.state == "failed":
            raise _unprocessable(
                f"model {record.model_id!r} could not be created: {record.failure}"
            )
        return json_response(await self._operations.get_info(record.model_id))

    async def _unload_model(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        unload: _wire.UnloadModelRequest = await self._decode("unload_model", raw, obj)
        model_id = unload.model_id
        self._check_owner(request, model_id)
        keys = self._idempotency_keys(request, "unload_model")
        # A retry may arrive after the unload finished and the model is gone.
        known = next((k for k in map(self._executor.lookup, keys) if k is not None), None)
        record = self._registry.models.get(model_id)
        if known is None and record is not None:
            known = record.unload_request_id
        if known is not None:
            return _ack(known, model_id)
        record = self._model(model_id)
        reason = f"model {model_id!r} was unloaded before this request ran"
        record.unload_request_id = self._executor.submit(
            "unload_model", self._operations.unload(model_id, reason), keys=keys, model_id=model_id
        )
        record.state = "unloading"
        return _ack(record.unload_request_id, model_id)

    # ------------------------------------------------------------------ futures

    async def _retrieve_future(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.RetrieveFutureRequest = await self._decode("retrieve_future", raw, obj)
        access_log.note(request_id=req.request_id)
        wanted = dialect.result_encoding(request.headers)
        try:
            body, encoding = await self._executor.retrieve(req.request_id, encoding=wanted)
        except UnknownRequestError as exc:
            raise _not_found(f"request_id: {exc}") from None
        except RequestExpiredError as exc:
            raise Problem(410, f"request_id: {exc}", "GoneError") from None
        if encoding == "protobuf":
            return web.Response(body=body, content_type=tinker_wire.PROTOBUF_CONTENT_TYPE)
        return web.Response(body=body, content_type="application/json")

    async def _cancel_future(self, request: web.Request) -> web.Response:
        """tinker's ``cancel_future`` (and firetitan's, for abandoned samples): drop a
        request that has not run (`Executor.cancel`)."""
        raw, obj = await self._object(request)
        req: _wire.CancelFutureRequest = await self._decode("cancel_future", raw, obj)
        request_id = req.request_id
        try:
            cancelled = self._executor.cancel(request_id)
        except UnknownRequestError as exc:
            raise _not_found(f"request_id: {exc}") from None
        except RequestExpiredError as exc:
            raise Problem(410, f"request_id: {exc}", "GoneError") from None
        return json_response({"type": "cancel_future", "cancelled": cancelled})

    # ------------------------------------------------------------------ sampling

    async def _create_sampling_session(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.CreateSamplingSessionRequest = await self._decode(
            "create_sampling_session", raw, obj
        )
        self._session(req.session_id)
        model_path = None
        if req.model_path is not None:
            model_path = self._store_path(req.model_path, "sampler", "model_path")
        elif not req.base_model:
            raise _unprocessable("one of model_path or base_model is required")
        sampling = self._registry.create_sampling_session(
            req.session_id, req.sampling_session_seq_id, model_path, req.base_model
        )
        return json_response(
            {"type": "create_sampling_session", "sampling_session_id": sampling.sampling_session_id}
        )

    async def _create_custom_loss(self, request: web.Request) -> web.Response:
        """tinker's upload of a traced loss (`firetitan.local.loss_graphs`); a retry, by
        ``(session_id, custom_loss_seq_id)``, gets the same request id."""
        raw, obj = await self._object(request)
        req: _wire.CreateCustomLossRequest = await self._decode("create_custom_loss", raw, obj)
        self._session(req.session_id)
        keys: list[Hashable] = [("create_custom_loss", req.session_id, req.custom_loss_seq_id)]
        request_id = self._executor.lookup(keys[0])
        if request_id is None:
            keys += self._idempotency_keys(request, "create_custom_loss")
            run = self._operations.create_custom_loss(req)
            request_id = self._executor.submit("create_custom_loss", run, keys=keys)
        access_log.note(request_id=request_id)
        return json_response(_wire.encode_future_ack(_wire.FutureAck(request_id=request_id)))

    async def _asample(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.SampleRequest = await self._decode("asample", raw, obj)
        keys = self._idempotency_keys(request, "asample")
        sampling: SamplingSession | None = None
        if req.sampling_session_id is not None:
            sampling = self._registry.sampling.get(req.sampling_session_id)
            if sampling is None:
                raise _not_found(f"sampling_session_id: unknown {req.sampling_session_id!r}")
            if req.seq_id is not None:
                keys.append(("sample", req.sampling_session_id, req.seq_id))
        model_path = sampling.model_path if sampling else None
        if req.model_path is not None:
            model_path = self._store_path(req.model_path, "sampler", "model_path")
        base_model = req.base_model or (sampling.base_model if sampling else None)
        if model_path is None and not base_model:
            raise _unprocessable("one of model_path, base_model or sampling_session_id is required")
        self._check_sample_budget(req)
        expect = self._likely_encoding(sampling.session_id if sampling else None)
        ticket = SampleTicket(sampling.session_id if sampling else None)
        run = self._operations.sample(
            req, model_path=model_path, base_model=base_model, expect=expect, ticket=ticket
        )
        if sampling is not None and req.seq_id is not None:
            target = self._completions.target_of(sampling.sampling_session_id, req.seq_id)
            run = self._completions.tracked(target, lambda: ticket.request_id, run)
        request_id = self._executor.submit("asample", run, keys=keys)
        ticket.request_id = request_id
        access_log.note(request_id=request_id)
        # tinker requires one id per sample; a retry gets the same request id, so the same ids.
        ids = tinker_compat.sample_sequence_ids(request_id, req.num_samples)
        ticket.sequence_ids = ids
        ack = _wire.FutureAck(request_id=request_id, sample_sequence_ids=ids)
        return json_response(_wire.encode_future_ack(ack))

    async def _retrieve_futures(self, request: web.Request) -> web.Response:
        """tinker's per-sampling-session completion poll (`firetitan.local.completions`)."""
        _raw, obj = await self._object(request)
        target = obj.get("target")
        if not isinstance(target, dict):
            raise _bad_request(_wire.WireError("target", "must be an object"))
        sampling_session_id = _sampling_session_id(target, "target.sampling_session_id")
        if sampling_session_id not in self._registry.sampling:
            raise _not_found(f"target.sampling_session_id: unknown {sampling_session_id!r}")
        clone = target.get("cloned_sampler_id", 0)
        prev_cursor = obj.get("prev_cursor", 0)
        timeout = obj.get("timeout")
        for name, value in (("target.cloned_sampler_id", clone), ("prev_cursor", prev_cursor)):
            if type(value) is not int or value < 0:
                raise _bad_request(_wire.WireError(name, "must be a non-negative integer"))
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float)
        ):
            raise _bad_request(_wire.WireError("timeout", "must be a number or null"))
        answer = await self._completions.retrieve(
            (sampling_session_id, clone), prev_cursor, None if timeout is None else float(timeout)
        )
        return json_response(answer)

    async def _join_sampling_session(self, request: web.Request) -> web.Response:
        _raw, obj = await self._object(request)
        sampling_session_id = _sampling_session_id(obj, "sampling_session_id")
        if sampling_session_id not in self._registry.sampling:
            raise _not_found(f"sampling_session_id: unknown {sampling_session_id!r}")
        counter = self._completions.join(sampling_session_id)
        return json_response({"type": "join_sampling_session", "client_counter": counter})

    def _check_sample_budget(self, req: _wire.SampleRequest) -> None:
        """Refuse (422) a sampling request larger than one request may be."""
        most = self.config.max_samples_per_request
        if req.num_samples > most:
            raise _unprocessable(
                f"num_samples is {req.num_samples}; one request may ask for at most {most} "
                "(max_samples_per_request): send several requests"
            )
        max_tokens = req.sampling_params.max_tokens
        per_sample = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        budget = self.config.max_sampled_tokens_per_request
        if req.num_samples * per_sample > budget:
            raise _unprocessable(
                f"num_samples * max_tokens is {req.num_samples} * {per_sample} = "
                f"{req.num_samples * per_sample} tokens; one request may generate at most "
                f"{budget} (max_sampled_tokens_per_request): send several requests"
            )

    async def _sampler(self, request: web.Request) -> web.Response:
        """tinker's ``GET samplers/{id}``: what a sampling session samples from."""
        sampling_session_id = request.match_info["sampling_session_id"]
        sampling = self._registry.sampling.get(sampling_session_id)
        if sampling is None:
            raise _not_found(f"sampling_session_id: unknown {sampling_session_id!r}")
        try:
            base_model = await asyncio.to_thread(self._operations.sampler_base_model, sampling)
        except UserError as exc:
            raise _not_found(f"sampling_session_id: {exc}") from None
        model_path = None
        if sampling.model_path is not None:
            model_path = self._client_path(sampling.session_id, "sampler", sampling.model_path)
        return json_response(
            {"sampler_id": sampling_session_id, "base_model": base_model, "model_path": model_path}
        )

    # ------------------------------------------------------------------ service

    async def _client_config(self, request: web.Request) -> web.Response:
        await self._object(request)
        # tinker sizes its forward_backward chunks by an estimate of their protobuf
        # size; half the body limit leaves room for a bad estimate (a datum bigger than
        # a chunk still goes alone).
        chunk_bytes = min(FWDBWD_MAX_CHUNK_BYTES, self.config.max_request_bytes // 2)
        return json_response(
            {
                **CLIENT_CONFIG_FLAGS,
                "fwdbwd_max_chunk_len": FWDBWD_MAX_CHUNK_LEN,
                "fwdbwd_max_chunk_bytes_count": chunk_bytes,
            }
        )

    async def _dynamic_config(self, request: web.Request) -> web.Response:
        await self._object(request)
        # tinker cancels the sampling requests whose futures it abandons (cancel_future).
        return json_response({"sample_cancel_enabled": True})

    async def _create_session(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.CreateSessionRequest = await self._decode("create_session", raw, obj)
        key = request.headers.get("X-Idempotency-Key")
        session_dialect = dialect.session_dialect(req.sdk_version)
        session_id = self._registry.create_session(self._now(), key, session_dialect)
        self._registry.sessions[session_id].user_metadata = dict(req.user_metadata) or None
        return json_response({"type": "create_session", "session_id": session_id})

    async def _heartbeat(self, request: web.Request) -> web.Response:
        raw, obj = await self._object(request)
        req: _wire.SessionHeartbeatRequest = await self._decode("session_heartbeat", raw, obj)
        self._session(req.session_id)
        return json_response({"type": "session_heartbeat"})

    async def _finish_session(self, request: web.Request) -> web.Response:
        await self._object(request)
        session_id = request.match_info["session_id"]
        if self._registry.ended(session_id):
            return json_response({})  # first finish wins; repeats are harmless
        if session_id not in self._registry.sessions:
            raise _not_found(f"session_id: unknown session {session_id!r}")
        self._end_session(session_id, "its session finished")
        return json_response({})

    async def _telemetry(self, request: web.Request) -> web.Response:
        await self._object(request)  # accepted and discarded
        return json_response({"status": "accepted"})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def _capabilities_handler(self, _request: web.Request) -> web.Response:
        return json_response({"supported_models": self._capabilities})

    async def _list_checkpoints(self, _request: web.Request) -> web.Response:
        names = await asyncio.to_thread(self.store.names, "state")
        return json_response({"checkpoints": names})

    @property
    def execution_log(self) -> list[ExecutionRecord]:
        """Requests executed so far, in order (``debug_execution_log`` serves it)."""
        return self._executor.execution_log

    async def _debug_log(self, _request: web.Request) -> web.Response:
        entries = [
            {"model_id": r.model_id, "seq_id": r.seq_id, "request_id": r.request_id, "kind": r.kind}
            for r in self.execution_log
        ]
        return json_response({"entries": entries})


def _sampling_session_id(obj: dict[str, Any], field: str) -> str:
    value = obj.get("sampling_session_id")
    if not isinstance(value, str) or not value:
        raise _bad_request(_wire.WireError(field, "must be a non-empty string"))
    return value


def _valid_name(name: str, field: str) -> str:
    try:
        return validate_name(name)
    except ValueError as exc:
        raise _unprocessable(f"{field}: {exc}") from None


def _address(obj: dict[str, Any]) -> tuple[str, int] | None:
    """A JSON body's ``(model_id, seq_id)``, read before decoding (for deduplication and
    holes), or None if either is missing or of the wrong type."""
    model_id, seq_id = obj.get("model_id"), obj.get("seq_id")
    if isinstance(model_id, str) and type(seq_id) is int:
        return model_id, seq_id
    return None


def _ack(request_id: str, model_id: str) -> web.Response:
    access_log.note(model_id=model_id, request_id=request_id)
    return json_response({"request_id": request_id, "model_id": model_id})


async def _ready(value: T) -> T:
    """An already decoded request, as `TrainerServer._ordered` takes its decoder."""
    return value
