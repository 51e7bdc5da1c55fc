"""The deployment's HTTP face: control plane, hot-load and completions on one origin.

Routes (deployment.md §2, §7; paths from the endpoint table, `firetitan._wire.endpoints`):

* ``LIST_ACCOUNTS``: the one account;
* ``LIST_ACCOUNTS`` + ``/{acct}/deployments/{dep}``: the deployment resource, 404
  otherwise;
* ``HOT_LOAD``: load a snapshot (answers when loaded, or after at most
  `HOT_LOAD_ANSWER_WAIT_SECONDS` with the load going on);
* ``HOT_LOAD_STATUS``: the replica's state;
* ``COMPLETIONS``: an SSE stream or one JSON body.

Hot-load targets travel in headers: ``fireworks-deployment`` must name this deployment
(404 otherwise) and ``fireworks-model``, when sent, its base model (400 otherwise).

Rules every response follows: the API key is required everywhere, as
``Authorization: Bearer`` or ``X-Api-Key`` (constant-time compare); errors are JSON
``{"error": {"code", "message"}}``; bodies over the size limit get 413; an overloaded
deployment answers 429 with ``Retry-After``; tracebacks stay in the server log.

Hot-load states, reported as ``replicas[0]`` (one replica): ``readiness`` is true once
the base model is built; ``current_snapshot_identity`` is the last snapshot loaded (None
before the first); ``loading_state`` is ``{"stage": "loading"|"done"|"error",
"target_snapshot_identity", "message"?}`` for the latest hot-load, absent before one. A
repeated POST for the identity being loaded or served changes nothing. Loading never
disturbs the snapshot being served: a failed load leaves it in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import torch
from aiohttp import web

from firetitan._wire import endpoints
from firetitan.local import access_log, rules
from firetitan.local.connections import ConnectionGuard, ConnectionLimits
from firetitan.local.deployment.batching import (
    Batcher,
    Event,
    Finish,
    Generation,
    PromptRows,
    Token,
)
from firetitan.local.deployment.completions import (
    CompletionRequest,
    RequestError,
    Rows,
    TokenText,
    envelope,
    parse_completion_request,
)
from firetitan.local.deployment.snapshots import Snapshot, SnapshotError, SnapshotLoader
from firetitan.local.engine import UserError
from firetitan.local.problems import ErrorDialect, Problem
from firetitan.local.torch.models import context_length, vocab_size
from firetitan.local.torch.sampling import plan_sampling

__all__ = ["DeploymentServer"]

log = logging.getLogger("firetitan.local.deployment")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HOT_LOAD_PATH = endpoints.HOT_LOAD.path
COMPLETIONS_PATH = endpoints.COMPLETIONS.path
_HOT_LOAD_KEYS = frozenset({"identity", "reset_prompt_cache", "incremental_snapshot_metadata"})
_METADATA_KEYS = frozenset({"previous_snapshot_identity", "compression_format", "checksum_format"})
#: Streams get their new tokens at most this often (see `_Mailbox`).
FLUSH_INTERVAL_SECONDS = 0.04
#: How long a hot-load POST waits for the load before answering "loading".
HOT_LOAD_ANSWER_WAIT_SECONDS = 2.0
_COMPRESSION = "arc_v2"
_CHECKSUM = "alder32"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=json.dumps)


#: Errors as the Fireworks inference API words them.
ERRORS = ErrorDialect(
    body=lambda problem: {"error": {"code": problem.code, "message": problem.message}},
    respond=_json,
    timeout_code="request_timeout",
    too_large_code="too_large",
    too_large=lambda limit: f"request body exceeds {limit} bytes",
    internal_code="internal_error",
    http_code="http_error",
    log=log,
)


class DeploymentServer:
    """One local inference deployment.

    Args:
        loader: Builds the base model and loads snapshots.
        api_key: The key every request must carry.
        account: The account id (``accounts/<account>``).
        deployment_id: The deployment id.
        max_request_bytes: Largest accepted request body.
        max_batch: Most sequences decoded together.
        max_queued: Most sequences waiting or running; beyond, 429.
        connection_limits: Head and body timeouts and the connection cap (the
            trainer's defaults when None).
        access_log: Log one INFO line per request to ``firetitan.access``
            (`firetitan.local.access_log`); ``firetitan deploy --access-log`` sets it.
    """

    def __init__(
        self,
        loader: SnapshotLoader,
        api_key: str,
        *,
        account: str = "local",
        deployment_id: str = "local-deployment",
        max_request_bytes: int = 8 * 1024 * 1024,
        max_batch: int = 256,
        max_queued: int = 4096,
        connection_limits: ConnectionLimits | None = None,
        access_log: bool = False,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.loader = loader
        self.account = account
        self.deployment_id = deployment_id
        self.model = f"accounts/{account}/deployments/{deployment_id}"
        self._key = api_key.encode("utf-8")
        self._max_request_bytes = max_request_bytes
        self._max_queued = max_queued
        self.batcher = Batcher(loader.tokenizer, loader.device, max_batch=max_batch)
        self._text = TokenText(loader.tokenizer)
        self.snapshot: Snapshot = loader.base
        self._loading_state: dict[str, Any] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._mailbox: _Mailbox | None = None
        self._guard = ConnectionGuard(connection_limits or ConnectionLimits(), log)
        self._access_log = access_log
        self.base_url = ""

    def __repr__(self) -> str:
        return f"DeploymentServer(base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the batcher, bind and serve; return the base URL.

        Raises:
            OSError: The address cannot be bound.
        """
        self._mailbox = _Mailbox(asyncio.get_running_loop())
        self.batcher.start()
        try:
            self._runner, self.base_url = await self._guard.serve(self.make_app(), host, port)
        except BaseException:
            await self.close()
            raise
        return self.base_url

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve for the length of the block, which gets the base URL (see `start`)."""
        try:
            yield await self.start(host, port)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop serving; fail generations still running."""
        runner, self._runner = self._runner, None
        await asyncio.to_thread(self.batcher.stop)
        if runner is not None:
            await runner.cleanup()
        if self._load_task is not None:
            await asyncio.gather(self._load_task, return_exceptions=True)

    def make_app(self) -> web.Application:
        middlewares = [ERRORS.middleware(self._max_request_bytes), self._auth_middleware]
        if self._access_log:
            middlewares.insert(0, access_log.middleware)
        app = web.Application(middlewares=middlewares, client_max_size=self._max_request_bytes)
        self._guard.install(app)  # outermost
        accounts = endpoints.LIST_ACCOUNTS.path
        app.add_routes(
            [
                web.get(accounts, self._accounts, allow_head=False),
                web.get(f"{accounts}/{{account}}/deployments/{{deployment}}", self._deployment,
                        allow_head=False),
                web.post(endpoints.HOT_LOAD.path, self._hot_load),
                web.get(endpoints.HOT_LOAD_STATUS.path, self._hot_load_status, allow_head=False),
                web.post(endpoints.COMPLETIONS.path, self._completions),
            ]
        )  # fmt: skip
        return app

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        bearer = request.headers.get("Authorization", "")
        provided = bearer[7:] if bearer[:7].lower() == "bearer " else None
        if provided is None:
            provided = request.headers.get("X-Api-Key")
        if provided is None:
            raise Problem(
                401, "missing API key (Authorization: Bearer or X-Api-Key)", "unauthenticated"
            )
        if not hmac.compare_digest(provided.encode("utf-8", "replace"), self._key):
            raise Problem(401, "invalid API key", "unauthenticated")
        return await handler(request)

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError as exc:
            raise Problem(
                400, f"the body is not valid JSON: {exc}", "invalid_request_error"
            ) from None

    # ------------------------------------------------------------------ control plane

    def _resource(self) -> dict[str, Any]:
        return {
            "name": self.model,
            "displayName": self.deployment_id,
            "state": "READY",
            "baseModel": self.loader.base_model,
            "enableHotLoad": True,
            "hotLoadBucketType": "LOCAL",
            "hotLoadBucketUrl": self.loader.root.as_uri(),
            "hotLoadTransitionType": "SYNC",
            "hotLoadTrainerJob": "",
            "minReplicaCount": 1,
            "maxReplicaCount": 1,
            "replicaCount": 1,
        }

    async def _accounts(self, _request: web.Request) -> web.Response:
        return _json({"accounts": [{"name": f"accounts/{self.account}"}], "totalSize": 1})

    async def _deployment(self, request: web.Request) -> web.Response:
        account, deployment = request.match_info["account"], request.match_info["deployment"]
        if (account, deployment) != (self.account, self.deployment_id):
            raise Problem(
                404, f"deployment accounts/{account}/deployments/{deployment} not found",
                "not_found",
            )  # fmt: skip
        return _json(self._resource())

    # ------------------------------------------------------------------ hot-load

    def _check_target(self, request: web.Request) -> None:
        target = request.headers.get("fireworks-deployment")
        if target != self.model:
            raise Problem(
                404,
                f"unknown deployment {target!r} in the fireworks-deployment header; "
                f"this is {self.model!r}",
                "not_found",
            )
        model = request.headers.get("fireworks-model")
        if model is not None and model != self.loader.base_model:
            raise Problem(
                400,
                f"fireworks-model {model!r} does not match the deployment's base model "
                f"{self.loader.base_model!r}",
                "invalid_request_error",
            )

    async def _hot_load(self, request: web.Request) -> web.Response:
        self._check_target(request)
        identity, previous = _hot_load_body(await self._body(request))
        state = self._loading_state
        busy = self._load_task is not None and not self._load_task.done()
        if (
            state is not None
            and state["target_snapshot_identity"] == identity
            and (busy or state["stage"] == "done")
        ):
            return _json({"identity": identity, "stage": state["stage"]})  # a re-send
        if busy:
            assert state is not None
            raise Problem(
                503,
                f"snapshot {state['target_snapshot_identity']!r} is still loading",
                "unavailable",
                retry_after=1,
            )
        self._loading_state = {"stage": "loading", "target_snapshot_identity": identity}
        task = asyncio.get_running_loop().create_task(self._load(identity, previous))
        self._load_task = task
        # Clients poll every 5 s after a first immediate status check; a local load
        # mostly takes well under a second, so answering once it is done (or after a
        # short wait) saves each hot-load that poll interval.
        await asyncio.wait([task], timeout=HOT_LOAD_ANSWER_WAIT_SECONDS)
        state = self._loading_state
        stage = state["stage"] if task.done() and state is not None else "loading"
        return _json({"identity": identity, "stage": stage})

    async def _load(self, identity: str, previous: str | None) -> None:
        try:
            snapshot = await asyncio.to_thread(self.loader.load, identity, previous, self.snapshot)
        except SnapshotError as exc:
            log.warning("hot-load of %s failed: %s", identity, exc)
            self._loading_state = {
                "stage": "error",
                "target_snapshot_identity": identity,
                "message": str(exc),
            }
            return
        except Exception as exc:  # never leave the stage at "loading"
            log.exception("hot-load of %s failed", identity)
            self._loading_state = {
                "stage": "error",
                "target_snapshot_identity": identity,
                "message": f"internal error: {type(exc).__name__}",
            }
            return
        # New requests use the new weights; running ones keep theirs (batching.py).
        self.snapshot = snapshot
        self._loading_state = {"stage": "done", "target_snapshot_identity": identity}
        log.info("serving snapshot %s", identity)

    async def _hot_load_status(self, request: web.Request) -> web.Response:
        self._check_target(request)
        replica: dict[str, Any] = {
            "replica_id": f"{self.deployment_id}-r0",
            "current_snapshot_identity": self.snapshot.identity,
            "readiness": True,
            "loaded_adapters": [],
        }
        if self._loading_state is not None:
            replica["loading_state"] = dict(self._loading_state)
        return _json({"replicas": [replica]})

    # ------------------------------------------------------------------ completions

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            req = parse_completion_request(await self._body(request))
        except RequestError as exc:
            raise Problem(400, str(exc), "invalid_request_error") from None
        if req.model != self.model:
            raise Problem(
                400, f"model {req.model!r} is not served here; this is {self.model!r}",
                "invalid_request_error",
            )  # fmt: skip
        if self.batcher.load + req.n > self._max_queued:
            raise Problem(429, "too many requests in flight", "rate_limited", retry_after=1)
        snapshot = self.snapshot
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        gens = [self._generation(req, i, snapshot, queue) for i in range(req.n)]
        request_id = request.headers.get("x-request-id") or secrets.token_hex(16)
        try:
            for gen in gens:
                self.batcher.submit(gen, snapshot)
            if req.stream:
                return await self._stream(request, req, queue, request_id)
            return await self._whole(req, queue, request_id)
        except RuntimeError as exc:  # the batcher is stopping
            raise Problem(503, str(exc), "unavailable", retry_after=1) from None
        finally:
            for gen in gens:
                gen.cancel()

    def _generation(
        self,
        req: CompletionRequest,
        index: int,
        snapshot: Snapshot,
        queue: asyncio.Queue[tuple[int, Event]],
    ) -> Generation:
        module = snapshot.module
        params = req.sample_params(index)
        limits = rules.Limits(vocab_size=vocab_size(module), context_length=context_length(module))
        try:
            checked = rules.check_sampling(req.prompt, 1, params, limits)
            plan = plan_sampling(
                checked.prompt, checked.params, tokenizer=self.loader.tokenizer,
                context=limits.context_length,
            )  # fmt: skip
        except UserError as exc:
            raise Problem(400, str(exc), "invalid_request_error") from None
        generator = None
        if plan.seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(plan.seed)
        mailbox = self._mailbox
        assert mailbox is not None

        def listener(event: Event) -> None:  # runs on the batcher thread
            mailbox.post(queue, (index, event), urgent=isinstance(event, Finish))

        return Generation(
            prompt=req.prompt,
            plan=plan,
            generator=generator,
            top_logprobs=req.top_logprobs,
            echo=req.echo,
            listener=listener,
        )

    async def _stream(
        self,
        request: web.Request,
        req: CompletionRequest,
        queue: asyncio.Queue[tuple[int, Event]],
        request_id: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": request_id,
            }
        )
        await response.prepare(request)
        try:
            await self._write_stream(response, req, queue)
        except ConnectionResetError:  # the client left; its generations are cancelled
            log.debug("client left during a stream")
        return response

    async def _write_stream(
        self,
        response: web.StreamResponse,
        req: CompletionRequest,
        queue: asyncio.Queue[tuple[int, Event]],
    ) -> None:
        completion_id = f"cmpl-{secrets.token_hex(8)}"
        rows = [Rows(i, req, self._text) for i in range(req.n)]
        open_rows = req.n
        finishes: list[Finish] = []
        while open_rows:
            # Everything already queued goes out in one write.
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            out = bytearray()
            for index, event in _merge_tokens(events):
                row = rows[index]
                extra: dict[str, Any] = {}
                if isinstance(event, list):  # consecutive tokens of one sample
                    choice = row.tokens_choice(event)
                elif isinstance(event, PromptRows):
                    choice = row.prompt(event)
                elif isinstance(event, Finish):
                    open_rows -= 1
                    if event.reason == "error":
                        error = {"error": {"status_code": 503, "code": "unavailable",
                                           "message": event.message}}  # fmt: skip
                        await response.write(bytes(out) + _sse(error, event="error"))
                        return
                    finishes.append(event)
                    choice = row.final(event)
                    if open_rows == 0:
                        extra = self._summary(req, rows, finishes)
                else:
                    choice = row.token(event)
                out += _sse(envelope(completion_id, req.model, [choice], **extra))
            await response.write(bytes(out))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()

    async def _whole(
        self, req: CompletionRequest, queue: asyncio.Queue[tuple[int, Event]], request_id: str
    ) -> web.Response:
        rows = [Rows(i, req, self._text) for i in range(req.n)]
        finishes: dict[int, Finish] = {}
        while len(finishes) < req.n:
            index, event = await queue.get()
            if isinstance(event, PromptRows):
                rows[index].prompt(event)
            elif isinstance(event, Finish):
                if event.reason == "error":
                    raise Problem(503, event.message, "unavailable", retry_after=1)
                finishes[index] = event
            else:
                rows[index].token(event)
        choices = [rows[i].whole(finishes[i]) for i in range(req.n)]
        body = envelope(
            f"cmpl-{secrets.token_hex(8)}",
            req.model,
            choices,
            **self._summary(req, rows, list(finishes.values())),
        )
        response = _json(body)
        response.headers["x-request-id"] = request_id
        return response

    def _summary(
        self, req: CompletionRequest, rows: list[Rows], finishes: list[Finish]
    ) -> dict[str, Any]:
        generated = sum(len(r.tokens) for r in rows)
        extra: dict[str, Any] = {
            "usage": {
                "prompt_tokens": len(req.prompt),
                "completion_tokens": generated,
                "total_tokens": len(req.prompt) + generated,
            }
        }
        if req.perf_metrics:
            queued = max(f.queue_seconds for f in finishes)
            firsts = [f.first_token_seconds for f in finishes if f.first_token_seconds is not None]
            extra["perf_metrics"] = {
                "prefill-queue-duration": f"{queued:.6f}",
                "server-time-to-first-token": f"{min(firsts) if firsts else 0.0:.6f}",
                "num-concurrent-requests": str(self.batcher.load),
                "deployment": self.model,
            }
        return extra


class _Mailbox:
    """Hands the batcher thread's events to the event loop, at most once per
    `FLUSH_INTERVAL_SECONDS`.

    Every delivery costs each open stream a socket write, and each write gives the GIL
    back to the batcher thread, which may keep it for a while: one write per token per
    stream is what made a loaded deployment slow (profiled: socket sends were most of
    the loop's time at 64 streams). Grouping a stream's tokens per interval divides the
    writes; the first event after a quiet interval still goes out at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._last_drain = float("-inf")

    def post(self, queue: asyncio.Queue[Any], item: Any, *, urgent: bool = False) -> None:
        """Queue ``item`` for ``queue``; ``urgent`` delivers everything queued at once
        (the end of a generation: its caller waits for nothing else)."""
        with self._lock:
            self._items.append((queue, item))
            scheduled = len(self._items) > 1
        # A closed loop (the server stopped) has nobody left to listen.
        with contextlib.suppress(RuntimeError):
            if urgent:
                self._loop.call_soon_threadsafe(self._drain)
            elif not scheduled:
                self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        due = self._last_drain + FLUSH_INTERVAL_SECONDS
        self._loop.call_at(max(due, self._loop.time()), self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if not items:
            return  # an earlier urgent drain took them
        self._last_drain = self._loop.time()
        for queue, item in items:
            queue.put_nowait(item)


def _merge_tokens(
    events: list[tuple[int, Event]],
) -> list[tuple[int, Event | list[Token]]]:
    """``events`` with each run of one sample's consecutive tokens as one list (sent as
    one chunk: clients concatenate ``text`` and ``logprobs.content`` across chunks)."""
    out: list[tuple[int, Event | list[Token]]] = []
    for index, event in events:
        if isinstance(event, Token):
            if out and out[-1][0] == index and isinstance(out[-1][1], list):
                out[-1][1].append(event)
                continue
            out.append((index, [event]))
        else:
            out.append((index, event))
    return out


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _hot_load_body(body: object) -> tuple[str, str | None]:
    """``(identity, previous_snapshot_identity or None)`` of a hot-load body.

    Raises:
        Problem: 400 naming the field, in the words the Fireworks SDK reads.
    """
    if not isinstance(body, dict):
        raise Problem(400, "the body must be a JSON object", "invalid_request_error")
    for key in body:
        if key not in _HOT_LOAD_KEYS:
            raise Problem(
                400, f"Extra inputs are not permitted, field: {key!r}", "invalid_request_error"
            )
    identity = body.get("identity")
    if not isinstance(identity, str) or not identity:
        raise Problem(400, "identity: required, a snapshot name", "invalid_request_error")
    reset = body.get("reset_prompt_cache", True)
    if not isinstance(reset, bool):
        raise Problem(400, "reset_prompt_cache: must be a boolean", "invalid_request_error")
    # No prompt cache outlives a hot-load here (every sequence keeps only its own KV
    # cache), so there is nothing more to reset.
    metadata = body.get("incremental_snapshot_metadata")
    if metadata is None:
        return identity, None
    if not isinstance(metadata, dict):
        raise Problem(
            400, "incremental_snapshot_metadata: must be an object", "invalid_request_error"
        )
    for key in metadata:
        if key not in _METADATA_KEYS:
            raise Problem(
                400,
                f"Extra inputs are not permitted, field: 'incremental_snapshot_metadata.{key}'",
                "invalid_request_error",
            )
    previous = metadata.get("previous_snapshot_identity")
    if not isinstance(previous, str) or not previous:
        raise Problem(
            400,
            "incremental_snapshot_metadata.previous_snapshot_identity: required, a snapshot name",
            "invalid_request_error",
        )
    compression = metadata.get("compression_format", _COMPRESSION)
    checksum = metadata.get("checksum_format", _CHECKSUM)
    if compression != _COMPRESSION or checksum != _CHECKSUM:
        raise Problem(
            400,
            f"incremental_snapshot_metadata: this deployment reads compression_format "
            f"{_COMPRESSION!r} with checksum_format {_CHECKSUM!r}, got {compression!r} / "
            f"{checksum!r}",
            "invalid_request_error",
        )
    return identity, previous
