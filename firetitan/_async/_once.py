"""`Once`: an async value made on first use, once, however many callers ask at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Once"]

T = TypeVar("T")


class Once(Generic[T]):
    """An async value made on first use.

    Concurrent callers share the one attempt; a failed attempt is not remembered, so
    the next caller tries again. The constructor touches no event loop.

    Args:
        make: Makes the value.
        value: The value, when it is known already (then ``make`` never runs).
    """

    def __init__(self, make: Callable[[], Awaitable[T]], value: T | None = None) -> None:
        self._make = make
        self.value = value
        self._lock: asyncio.Lock | None = None

    async def get(self) -> T:
        """The value, made now if it was not made yet."""
        if self.value is not None:
            return self.value
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.value is None:
                self.value = await self._make()
            return self.value
