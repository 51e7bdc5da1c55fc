"""`AdaptiveLimit`: how many requests may be in flight to one deployment.

Additive increase, multiplicative decrease: every success lets the limit grow by about
one per window of requests, up to its ceiling; an overload answer (429, 503) halves it
once per overload episode, and holds every new attempt until the server's
``Retry-After`` has passed. Many requests failing together therefore shrink the window
once, not once each, and none of them hammers a server that asked for quiet.

No I/O here: the transport calls `slot` around each attempt and `overloaded` when the
server pushes back.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["AdaptiveLimit"]


class AdaptiveLimit:
    """A concurrency limit between ``minimum`` and ``maximum`` that adapts to overload.

    Args:
        maximum: The ceiling, and the starting limit.
        minimum: The floor.
    """

    def __init__(self, maximum: int, *, minimum: int = 1) -> None:
        if maximum < minimum or minimum < 1:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum} and {maximum}")
        self._min = minimum
        self._max = maximum
        self._limit = float(maximum)
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._resume_at = 0.0

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._limit)

    @property
    def active(self) -> int:
        """Attempts in flight now."""
        return self._active

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one place for the duration of an attempt."""
        await self._acquire()
        try:
            yield
        finally:
            self._active -= 1
            self._wake()

    def succeeded(self) -> None:
        """An attempt went through: grow by one per window of successes."""
        self._limit = min(float(self._max), self._limit + 1.0 / self._limit)
        self._wake()

    def overloaded(self, retry_after: float) -> None:
        """The server answered 429/503: halve the limit (once per episode) and hold new
        attempts for ``retry_after`` seconds."""
        now = asyncio.get_running_loop().time()
        if now >= self._resume_at:
            self._limit = max(float(self._min), self._limit / 2)
        self._resume_at = max(self._resume_at, now + retry_after)

    async def _acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            hold = self._resume_at - loop.time()
            if hold > 0:
                await asyncio.sleep(hold)
                continue
            if self._active < int(self._limit):
                self._active += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # it was woken: pass the wake-up on
                raise

    def _wake(self) -> None:
        free = int(self._limit) - self._active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
