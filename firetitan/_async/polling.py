"""Long-polling ``retrieve_future`` (wire.md §4) with a bound on concurrent polls.

A trainer runs one model's requests in ``seq_id`` order, so a later request cannot
finish before an earlier one: polling only the oldest few pending requests of a model
loses no time, and a thousand futures in flight cost a handful of connections rather
than a thousand. Each `Poller` admits at most ``limit`` polls at once through a FIFO
semaphore; callers enter in submission order, so the oldest requests poll first.

Transport-level failures (connection errors, 408, 429, 5xx) are retried by the
transport; what reaches here is an outcome (§4.3) or a final error: 410 becomes
`GoneError`, 404 `NotFoundError`. A poll that is lost (timeout, dropped connection)
is simply sent again, so a lost answer never turns into a hang.

A ``try_again`` names the trainer's queue state (``active``, ``paused_rate_limit``,
``paused_capacity``...) and may say why (``queue_state_reason``). Each change of state,
and the return to ``active`` when a result comes, is logged once with the reason and
handed to ``ClientConfig.on_queue_state``: once per service client, whose training and
sampling clients share its transport and with it one view of the trainer's queue.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from firetitan import _wire
from firetitan._errors import APIStatusError, RequestFailedError
from firetitan._transport import PROTOBUF, ProtobufBody, Transport, decode_result
from firetitan._wire import endpoints

__all__ = ["Poller"]

log = logging.getLogger("firetitan")

# A trainer that answers try_again at once (rather than holding the poll) would be
# hammered by an immediate re-poll; such answers get a short, growing pause.
_FAST_ANSWER_S = 0.5
_MAX_PAUSE_S = 0.5


class Poller:
    """Resolves request ids into their success payloads, ``limit`` polls at a time."""

    def __init__(self, transport: Transport, limit: int) -> None:
        self._transport = transport
        self._limit = limit
        self._slots: asyncio.Semaphore | None = None
        # Set when the trainer refused a protobuf-only poll (406): ask for JSON from then on.
        self._json_only = False
        self._queue = _queue_watch(transport)

    async def wait(self, request_id: str, request_type: str, *, protobuf: bool = False) -> Any:
        """Long-poll ``request_id`` until it resolves and return its payload.

        Args:
            request_id: The trainer's id from the submission's ACK.
            request_type: The operation, sent as ``X-Tinker-Request-Type``.
            protobuf: Ask for the result as protobuf (wire.md §4.7; forward and
                forward_backward results). A trainer may still answer JSON.

        Returns:
            The success payload: parsed JSON, or a `ProtobufBody`.

        Raises:
            RequestFailedError: The request failed on the trainer.
            GoneError: The trainer no longer knows the result (410).
            NotFoundError: The trainer never knew the request (404).
            APIResponseValidationError: An answer that does not follow §4.3.
            APIError: The trainer stayed unreachable for the whole retry deadline.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._limit)
        async with self._slots:
            return await self._poll(request_id, request_type, protobuf)

    async def _poll(self, request_id: str, request_type: str, protobuf: bool) -> Any:
        loop = asyncio.get_running_loop()
        allow_metadata_only = True
        iteration = 0
        fast_answers = 0
        while True:
            body = _wire.encode_request(
                _wire.RetrieveFutureRequest(
                    request_id=request_id, allow_metadata_only=allow_metadata_only
                )
            )
            started = loop.time()
            headers = {
                "X-Tinker-Request-Type": request_type,
                "X-Tinker-Request-Iteration": str(iteration),
            }
            if protobuf and not self._json_only:
                # Protobuf alone: a trainer that lists JSON as acceptable answers JSON.
                headers["Accept"] = PROTOBUF
            try:
                answer = await self._transport.post(
                    endpoints.RETRIEVE_FUTURE.path, body, pool="poll", headers=headers
                )
            except APIStatusError as exc:
                if exc.status_code != 406 or "Accept" not in headers:
                    raise
                self._json_only = True  # this trainer serves JSON only; ask again
                continue
            iteration += 1
            if isinstance(answer, ProtobufBody):
                return answer  # only success payloads travel as protobuf
            outcome = decode_result(endpoints.RETRIEVE_FUTURE, answer, request_id=request_id)
            if isinstance(outcome, _wire.FutureResult):
                self._queue.note("active", None, request_id)
                return outcome.payload
            if isinstance(outcome, _wire.FutureFailed):
                raise RequestFailedError(
                    outcome.error,
                    request_id=request_id,
                    category=outcome.category,
                    error_class=outcome.error_class,
                )
            if isinstance(outcome, _wire.CompleteMetadata):
                # Ready but large: fetch the full body next (the flag never goes back).
                allow_metadata_only = False
                continue
            # TryAgain: the trainer held the poll as long as it wanted; ask again.
            state = outcome.queue_state or "active"
            self._queue.note(state, outcome.queue_state_reason, request_id)
            if loop.time() - started < _FAST_ANSWER_S:
                fast_answers += 1
                await asyncio.sleep(min(_MAX_PAUSE_S, 0.005 * 2**fast_answers))
            else:
                fast_answers = 0


class _QueueWatch:
    """The last queue state a trainer reported to one service client's clients."""

    def __init__(self, transport: Transport) -> None:
        self._config = transport.config
        self._state = "active"

    def note(self, state: str, reason: str | None, request_id: str) -> None:
        """Log and report ``state`` if it differs from the last one."""
        if state == self._state:
            return
        self._state = state
        because = f" ({reason})" if reason else ""
        if state == "active":
            log.info("trainer queue is active again%s (request %s)", because, request_id)
        else:
            log.warning("trainer queue is %s%s; request %s waits", state, because, request_id)
        callback = self._config.on_queue_state
        if callback is not None:
            callback(state, reason)


_WATCHES: weakref.WeakKeyDictionary[Transport, _QueueWatch] = weakref.WeakKeyDictionary()


def _queue_watch(transport: Transport) -> _QueueWatch:
    watch = _WATCHES.get(transport)
    if watch is None:
        watch = _WATCHES[transport] = _QueueWatch(transport)
    return watch
