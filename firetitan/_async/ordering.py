"""The per-model send queue: call order, seq_ids and pipelining.

Every ordered RPC of a training client becomes a `Call` on its model's `OrderedQueue`.
One sender task at a time drains the queue (a sender that empties the queue completes
its last call itself and the next call starts a new one), and these invariants hold:

* **Call order is send order.** The queue is FIFO and the RPC methods are plain
  ``def``s that run on the client's loop, so whoever calls, the order of calls is the
  order of entries, and the trainer runs them in that order.
* **seq_ids are assigned at send time**, contiguous and 1-based per model; a call with
  k chunks takes k consecutive ids. A call abandoned before it was sent (cancelled,
  or past its deadline) is skipped and takes no id, so it leaves no gap. Retries of a
  submission resend the same body, so they keep their ``seq_id`` (and the transport
  keeps their idempotency key): the trainer runs a retried request once.
* **Pipelining:** the next entry is sent as soon as the previous entry's POSTs are
  acknowledged, never after its *result*. Chunks of one call upload concurrently.
* **A failed or cancelled call never stalls later ones.** The sender never waits on a
  future that a user can cancel. Besides ACKs, the only thing it waits on is the
  *gate* of a custom-loss backward, which its owner always opens or drops.
* **Only the sender task writes ``next_seq``**, and it sends one call at a time.

Failed submissions (a design choice)
------------------------------------
Unlike the reference client, which poisons the whole client, a submission that fails
permanently (a 4xx answer, or retries exhausted) fails **that call's future only**;
later calls still run. The consequence, which callers should know: the trainer runs
later calls on whatever state it has. An ``optim_step`` right after a failed
``forward_backward`` steps on the gradients accumulated without that batch (or with
part of it, when only some of its chunks were refused). Await a batch's future before
relying on the step after it when that matters; a warning is logged when it happens.

seq_id bookkeeping after a failure: when every chunk of the call was refused with a
4xx (other than 408 and 409), the trainer recorded none of them and the ids are reused
by the next call (no gap). Otherwise (some chunk was accepted, or its fate is unknown)
the ids are spent: reusing them could make the trainer answer a later call with this
one's result. The trainer's gap rule (wire.md §5.5) then skips the ids it never got.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import attrs

from firetitan import _wire
from firetitan._async._tasks import TaskSet
from firetitan._async.async_future import AsyncAPIFuture, FutureState
from firetitan._async.polling import Poller
from firetitan._errors import APIResponseValidationError, APIStatusError, ClientClosedError
from firetitan._transport import Transport
from firetitan._wire import endpoints

__all__ = [
    "JSON",
    "Call",
    "Finish",
    "OrderedQueue",
    "ack_request_id",
    "numbered",
    "template",
    "templates",
    "unfilled",
]

log = logging.getLogger("firetitan")

JSON = dict[str, Any]
#: Turns the success payloads of a call's chunks (in chunk order) into its result.
Finish = Callable[[list[Any]], Awaitable[Any]]


@attrs.define(eq=False)
class Call:
    """One entry of the send queue.

    Attributes:
        endpoint: The ordered endpoint it calls (its poll request type too).
        future: The caller's future.
        finish: Builds the result from the chunk payloads.
        bodies: One serialised request per chunk without its ``seq_id`` (`template`):
            a list, a future of it (a worker thread's task, or a failure to report in
            the call's turn), or None for a gated call not yet filled.
        offload: Encode and decode in worker threads (large batches).
        gate: For a custom-loss backward: the sender waits for it; True means
            ``bodies`` and ``finish`` are filled in, False that the call is dropped.
        protobuf: Ask for the results as protobuf (`finish` then gets
            `ProtobufBody` payloads where the trainer obliged).
    """

    endpoint: endpoints.Endpoint[Any]
    future: AsyncAPIFuture[Any]
    finish: Finish
    bodies: list[bytes] | asyncio.Future[list[bytes]] | None
    offload: bool = False
    gate: asyncio.Future[bool] | None = None
    protobuf: bool = False

    @property
    def kind(self) -> str:
        return self.endpoint.name


class OrderedQueue:
    """Sends one model's calls in order and resolves their futures."""

    def __init__(self, transport: Transport, poller: Poller, tasks: TaskSet, uploads: int) -> None:
        self._transport = transport
        self._poller = poller
        self._tasks = tasks
        self._queue: asyncio.Queue[Call] = asyncio.Queue()
        self._uploads = asyncio.Semaphore(uploads)
        self._sender: asyncio.Task[None] | None = None
        self._next_seq = 1

    @property
    def next_seq(self) -> int:
        """The seq_id the next sent request will carry."""
        return self._next_seq

    def put(self, call: Call) -> None:
        """Append a call; a sender task starts unless one is running."""
        self._queue.put_nowait(call)
        if self._sender is None:
            self._sender = self._tasks.spawn(self._send_loop(), name="firetitan sender")

    def fail_queued(self, reason: str) -> None:
        """Fail every call not sent yet with `ClientClosedError` (the owner closes)."""
        while not self._queue.empty():
            self._queue.get_nowait().future._set_exception(ClientClosedError(reason))

    async def _send_loop(self) -> None:
        while True:
            call = await self._queue.get()
            try:
                sent = await self._send_one(call)
            except Exception as exc:  # the sender must survive anything one call does
                log.exception("firetitan: unexpected error while sending %s", call.kind)
                call.future._set_exception(exc)
                continue
            if sent is None:
                continue
            if self._queue.empty():
                # Nothing else to send: this task hands the sender's role back and
                # completes the call itself, which saves starting a task (a turn of
                # the loop) for it; the next call starts a new sender. One task sends
                # at a time either way, since the role is handed back only after a send.
                self._sender = None
                task = asyncio.current_task()
                assert task is not None
                call.future._on_finish(task.cancel)  # abandoning the call stops its polls
                await self._complete(call, sent)
                return
            self._start_completion(call, sent)

    async def _send_one(self, call: Call) -> list[str] | None:
        """Send a call's chunks; return their request ids if it is to be completed."""
        if call.gate is not None and not await call.gate:
            return None  # a custom-loss backward whose loss failed or was abandoned
        if call.future.done():
            return None  # abandoned before it was sent: it takes no seq_id
        try:
            bodies = call.bodies if isinstance(call.bodies, list) else await _built(call.bodies)
        except Exception as exc:  # encoding failed: nothing was sent, no seq_id taken
            call.future._set_exception(exc)
            return None
        first = self._next_seq
        encoded = [numbered(body, first + offset) for offset, body in enumerate(bodies)]
        if call.future.done():
            return None
        call.future._set_state(FutureState.SENDING)
        outcomes: list[str | BaseException]
        if len(encoded) == 1:
            # Most calls are one chunk: awaited here rather than through gather, which
            # would wrap it in a task and cost the call a turn of the event loop.
            try:
                outcomes = [await self._submit(call, encoded[0])]
            except Exception as exc:
                outcomes = [exc]
        else:
            outcomes = await asyncio.gather(
                *(self._submit(call, data) for data in encoded), return_exceptions=True
            )
        ids = [o for o in outcomes if isinstance(o, str)]
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for request_id in ids:
            call.future._add_request_id(request_id)
        if not errors:
            self._next_seq += len(bodies)
            call.future._set_state(FutureState.SENT)
            # Abandoned while sending: nobody polls.
            return None if call.future.done() else ids
        for error in errors:
            if not isinstance(error, Exception):
                raise error  # the sender itself is being cancelled
        refused = not ids and all(_refused(e) for e in errors)
        if not refused:
            self._next_seq += len(bodies)
        log.warning(
            "firetitan: %s (seq_id %d..%d) could not be submitted; later calls on this "
            "model still run: %s",
            call.kind,
            first,
            first + len(bodies) - 1,
            errors[0],
        )
        call.future._set_exception(errors[0])
        return None

    async def _submit(self, call: Call, data: bytes) -> str:
        async with self._uploads:
            # The body is already bytes and the ACK is tiny: nothing to offload.
            answer = await self._transport.post(call.endpoint.path, data)
        return ack_request_id(answer, call.kind)

    def _start_completion(self, call: Call, request_ids: list[str]) -> None:
        task = self._tasks.spawn(self._complete(call, request_ids), name=f"firetitan {call.kind}")
        # Abandoning the future (cancel, deadline) stops its polling.
        call.future._on_finish(task.cancel)

    async def _complete(self, call: Call, request_ids: list[str]) -> None:
        try:
            kind, protobuf = call.endpoint.request_type, call.protobuf
            if len(request_ids) == 1:
                payloads = [await self._poller.wait(request_ids[0], kind, protobuf=protobuf)]
            else:
                # Created in chunk order, so the poller admits them oldest first.
                polls = [
                    asyncio.ensure_future(self._poller.wait(rid, kind, protobuf=protobuf))
                    for rid in request_ids
                ]
                try:
                    payloads = list(await asyncio.gather(*polls))
                finally:
                    for poll in polls:
                        poll.cancel()
            call.future._set_result(await call.finish(payloads))
        except Exception as exc:
            call.future._set_exception(exc)


def _refused(error: BaseException) -> bool:
    """Whether the trainer certainly did not record the request: a final 4xx answer,
    except 408 and 409, which a proxy or a lock can give after the trainer saw it."""
    return (
        isinstance(error, APIStatusError)
        and 400 <= error.status_code < 500
        and error.status_code not in (408, 409)
    )


async def unfilled(payloads: list[Any]) -> NoReturn:
    """The `Finish` of a gated call before its owner fills it in."""
    raise AssertionError("a gated call was sent before it was filled in")


async def _built(task: asyncio.Future[list[bytes]] | None) -> list[bytes]:
    assert task is not None
    # shield: the encode task belongs to the call, not to the sender's await.
    return await asyncio.shield(task)


def template(body: JSON) -> bytes:
    """``body`` serialised without its ``seq_id`` and opening brace, for `numbered`.

    Calls are serialised when they are made, and only numbered when sent: a queued
    call then holds one bytes object rather than its whole JSON tree (many queued
    calls otherwise feed the garbage collector's costly full collections), and
    numbering costs one concatenation rather than a serialisation on the sender.

    Raises:
        ValueError: A value JSON cannot carry, e.g. NaN (a `_wire.WireError`).
    """
    body.pop("seq_id", None)
    data = _wire.dumps(body)
    if data == b"{}":
        raise ValueError("an ordered request body needs fields besides seq_id")
    return data[1:]


def numbered(template: bytes, seq_id: int) -> bytes:
    """The request body of a `template` with its ``seq_id`` (sent as the first key)."""
    return b'{"seq_id":%d,' % seq_id + template


def templates(bodies: list[JSON]) -> list[bytes] | ValueError:
    """`template` of every body, or the error of a body that cannot be serialised:
    its call is then to fail in its turn, unsent and without a seq_id (`failed_bodies`).
    Needs no event loop."""
    try:
        return [template(body) for body in bodies]
    except ValueError as exc:
        return exc


def failed_bodies(exc: BaseException) -> asyncio.Future[list[bytes]]:
    """`Call.bodies` for a call that cannot be encoded: the sender fails its future
    with `exc` in its turn (loop thread)."""
    failed: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
    failed.set_exception(exc)
    failed.exception()  # retrieved: the sender reports it through the call's future
    return failed


def ack_request_id(answer: Any, what: str) -> str:
    """The ``request_id`` of a submission's ACK (wire.md §4.1).

    Raises:
        APIResponseValidationError: The ACK has no string ``request_id``.
    """
    request_id = answer.get("request_id") if isinstance(answer, dict) else None
    if not isinstance(request_id, str) or not request_id:
        raise APIResponseValidationError(
            f"{what} was acknowledged without a string request_id", body=answer
        )
    return request_id
