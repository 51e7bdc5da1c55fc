"""tinker's sampling-session completion queues: ``retrieve_futures`` and
``join_sampling_session``.

With ``sample_use_retrieve_futures`` a tinker sampling client runs one long poll per
sampling session (and clone) instead of one per sample: ``POST retrieve_futures`` with
``{"target": {"sampling_session_id", "cloned_sampler_id"}, "prev_cursor", "timeout",
"retrieved_request_ids"}`` answers ``{"completions": [{"state": "finished" | "failed",
"request_id"}], "cursor"}``, the samples that completed after ``prev_cursor``. The client
then fetches each result with ``retrieve_future`` as before. A sample belongs to the
target of its ``sampling_session_id`` and of its ``seq_id // 1_000_000_000`` (the clone
id; 0 for the original client).

``join_sampling_session`` hands an unpickled clone of a sampling client its clone id,
unique in the session, so that clones never reuse each other's ``seq_id`` blocks.

Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Final, Literal, TypeVar

import attrs

from firetitan.local.executor import wait_event

__all__ = ["CLONE_BLOCK", "CompletionQueues", "Target"]

#: Each clone of a sampling client numbers its requests in its own block of seq_ids.
CLONE_BLOCK: Final = 1_000_000_000
#: The longest a retrieve_futures poll is held (tinker's client waits 45 s).
MAX_HOLD_SECONDS: Final = 30.0
#: Completions a target keeps that its client has not acknowledged with a cursor.
MAX_EVENTS: Final = 100_000

Target = tuple[str, int]
R = TypeVar("R")
State = Literal["finished", "failed"]


@attrs.define
class _Queue:
    events: collections.deque[tuple[int, str, State]] = attrs.field(factory=collections.deque)
    cursor: int = 0
    changed: asyncio.Event = attrs.field(factory=asyncio.Event)


class CompletionQueues:
    """Per target, the samples that completed, in completion order, by cursor."""

    def __init__(self) -> None:
        self._queues: dict[Target, _Queue] = {}
        self._clients: collections.Counter[str] = collections.Counter()

    def target_of(self, sampling_session_id: str, seq_id: int) -> Target:
        return sampling_session_id, seq_id // CLONE_BLOCK

    def join(self, sampling_session_id: str) -> int:
        """A new clone id for a sampling session (1, 2, ...; 0 is the original)."""
        self._clients[sampling_session_id] += 1
        return self._clients[sampling_session_id]

    def forget(self, sampling_session_id: str) -> None:
        """Drop an ended sampling session's queues."""
        self._clients.pop(sampling_session_id, None)
        for target in [t for t in self._queues if t[0] == sampling_session_id]:
            del self._queues[target]

    def tracked(
        self, target: Target, request_id: Callable[[], str], run: Callable[[], Awaitable[R]]
    ) -> Callable[[], Awaitable[R]]:
        """``run``, reporting its completion to ``target``'s queue. ``request_id`` is
        read when it completes (the id is assigned when the work is submitted)."""

        async def reported() -> R:
            try:
                result = await run()
            except BaseException:
                self._add(target, request_id(), "failed")
                raise
            self._add(target, request_id(), "finished")
            return result

        return reported

    def _queue(self, target: Target) -> _Queue:
        return self._queues.setdefault(target, _Queue())

    def _add(self, target: Target, request_id: str, state: State) -> None:
        queue = self._queue(target)
        queue.cursor += 1
        queue.events.append((queue.cursor, request_id, state))
        while len(queue.events) > MAX_EVENTS:
            queue.events.popleft()
        queue.changed.set()

    async def retrieve(
        self, target: Target, prev_cursor: int, hold_seconds: float | None
    ) -> dict[str, object]:
        """The ``retrieve_futures`` answer: completions after ``prev_cursor``, waiting up
        to ``hold_seconds`` (the request's ``timeout``; at most `MAX_HOLD_SECONDS`) for
        one."""
        queue = self._queue(target)
        while queue.events and queue.events[0][0] <= prev_cursor:
            queue.events.popleft()  # seen by the client: trimmed
        hold = MAX_HOLD_SECONDS
        if hold_seconds is not None:
            hold = min(max(hold_seconds, 0.0), MAX_HOLD_SECONDS)
        if not queue.events and hold > 0:
            queue.changed.clear()
            await wait_event(queue.changed, hold)
        completions = [
            {"state": state, "request_id": request_id}
            for cursor, request_id, state in queue.events
            if cursor > prev_cursor
        ]
        cursor = max(prev_cursor, queue.events[-1][0]) if queue.events else prev_cursor
        return {"completions": completions, "cursor": cursor}
