"""`AsyncToyTraining`: RPC methods that submit in call order and return futures at once."""

from __future__ import annotations

import asyncio
import collections
import contextvars
from typing import TYPE_CHECKING

from firetitan._async._rpc import Start, rpc
from firetitan._async.async_future import AsyncAPIFuture

if TYPE_CHECKING:
    from fractions import Fraction

__all__ = ["AsyncToyTraining"]

_USER: contextvars.ContextVar[str] | None = None


class AsyncToyTraining:
    """A toy training client: steps run one at a time, in call order."""

    def __init__(self, name: str, log: list[str]) -> None:
        """Create the client (on the loop).

        Args:
            name: Its name.
            log: The execution log: every executed step appends its tag.
        """
        self._name = name
        self._log = log
        self._queue: collections.deque[tuple[str, float, AsyncAPIFuture[str]]] = collections.deque()
        self._runner: asyncio.Task[None] | None = None
        self.users: list[str] = []

    @property
    def name(self) -> str:
        """The client's name."""
        return self._name

    @property
    def log(self) -> list[str]:
        """A copy of the execution log."""
        return list(self._log)

    def step(self, tag: str, delay: float = 0.0) -> AsyncAPIFuture[str]:
        """Queue a step; it runs after every step queued before it.

        Args:
            tag: Logged when the step runs, and its result.
            delay: How long the step takes.

        Returns:
            A future for the tag.
        """
        from .service import USER

        self.users.append(USER.get())
        future: AsyncAPIFuture[str] = AsyncAPIFuture(kind="step", deadline=None)
        self._queue.append((tag, delay, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return future

    def fail(self, message: str) -> AsyncAPIFuture[str]:
        """Return a future that fails with `ValueError(message)`."""
        if not message:
            raise ValueError("message must not be empty")
        future: AsyncAPIFuture[str] = AsyncAPIFuture(kind="fail", deadline=None)
        future._set_exception(ValueError(message))
        return future

    @rpc
    def echo(self, text: str) -> Start[str]:
        """Return a future for ``text``; a non-string raises TypeError at the call."""
        if not isinstance(text, str):
            raise TypeError("text must be a string")
        return lambda: self._echo(text)

    def _echo(self, text: str) -> AsyncAPIFuture[str]:
        asyncio.get_running_loop()  # the start runs on the loop
        future: AsyncAPIFuture[str] = AsyncAPIFuture(kind="echo", deadline=None)
        future._set_result(text)
        return future

    def child(self, name: str) -> AsyncAPIFuture[AsyncToyTraining]:
        """Return a future for a new client sharing this one's log."""
        future: AsyncAPIFuture[AsyncToyTraining] = AsyncAPIFuture(kind="child", deadline=None)
        future._set_result(AsyncToyTraining(name, self._log))
        return future

    async def custom(self, tag: str) -> AsyncAPIFuture[str]:
        """Do some work first, then queue a step.

        Args:
            tag: As for `step`.
        """
        await asyncio.sleep(0)
        return self.step(tag)

    async def count(self) -> int:
        """Return how many steps ran."""
        return len(self._log)

    async def ratio(self) -> Fraction:
        """Return the share of steps that ran (an annotation imported for type checking only)."""
        from fractions import Fraction

        ran = sum(1 for entry in self._log if ":" not in entry)
        return Fraction(ran, max(len(self._log), 1))

    async def peer(self, other: AsyncToyTraining | None = None) -> str:
        """Return the name of `other`, or of this client."""
        return (other or self).name

    async def aclose(self) -> None:
        """Stop running steps."""
        if self._runner is not None:
            self._runner.cancel()

    async def _run(self) -> None:
        while self._queue:
            tag, delay, future = self._queue.popleft()
            if future.done():
                self._log.append(f"dropped:{tag}")  # cancelled while queued: never sent
                continue
            abandoned = asyncio.Event()
            future._on_finish(abandoned.set)
            waiter = asyncio.ensure_future(abandoned.wait())
            sleeper = asyncio.ensure_future(asyncio.sleep(delay))
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            sleeper.cancel()
            if future.done():
                self._log.append(f"abandoned:{tag}")
            else:
                self._log.append(tag)
                future._set_result(tag)
