"""`AsyncAPIFuture`: the handle every RPC method returns at once.

Invariants:

* A future belongs to the loop it was created on, and is resolved exactly once:
  with a result, an exception, or by cancellation (`cancel` or its deadline).
* Waiting never cancels anything: ``await fut``, `result_async` (also with a
  timeout) and cancellation of the waiting task leave the request alone. Only
  `cancel` abandons it.
* Abandoning a request that was not sent yet means it is never sent and takes no
  ``seq_id``. Abandoning a sent request stops its polling; the trainer still runs it
  (the protocol has no cancel endpoint), and later calls keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from firetitan._async._checks import positive_number
from firetitan._config import ClientConfig
from firetitan._errors import FutureTimeoutError

__all__ = ["AsyncAPIFuture", "FutureState", "resolve_deadline"]

T = TypeVar("T")


class FutureState(enum.StrEnum):
    """Where a request stands.

    ``QUEUED``: waiting in the client's send queue (not sent, no ``seq_id`` yet);
    ``SENDING``: its submission is in flight; ``SENT``: the trainer acknowledged it
    and it is being waited for; ``DONE``: it has a result; ``FAILED``: it has an
    exception; ``CANCELLED``: it was abandoned by `AsyncAPIFuture.cancel`.
    """

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AsyncAPIFuture(Generic[T]):
    """The eventual result of one request to the trainer.

    Awaitable (``result = await fut``). Waiting never cancels the request; use
    `cancel` to abandon it. Every future has a deadline (the client configuration's
    ``future_deadline`` unless the call gave another): a future still unresolved then
    fails with `FutureTimeoutError`.

    Done-callbacks run on the event loop that created the future; keep them short.
    """

    def __init__(self, *, kind: str, deadline: float | None) -> None:
        """Create a pending future on the running loop (used by the clients).

        Args:
            kind: The operation, e.g. ``"forward_backward"`` (for messages and reprs).
            deadline: Seconds from now until the future fails with
                `FutureTimeoutError`; None for no deadline.
        """
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[T] = self._loop.create_future()
        self._kind = kind
        self._state = FutureState.QUEUED
        self._request_ids: list[str] = []
        self._deadline = None if deadline is None else self._loop.time() + deadline
        self._timer: asyncio.TimerHandle | None = None
        if deadline is not None:
            self._timer = self._loop.call_at(self._deadline or 0.0, self._expire, deadline)
        # Owner clean-ups run together in `_finished`: one scheduled callback per
        # future rather than one per clean-up.
        self._cleanups: list[Callable[[], object]] = []
        # Tasks waiting in `result_async`, and `_on_settle` callbacks: released directly
        # when the result is set (see `_wake`).
        self._waiters: list[asyncio.Future[None]] = []
        self._settle: list[Callable[[AsyncAPIFuture[T]], object]] = []
        self._future.add_done_callback(self._finished)

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> FutureState:
        """Where the request stands (`FutureState`)."""
        if self._future.cancelled():
            return FutureState.CANCELLED
        if self._future.done():
            return FutureState.FAILED if self._future.exception() else FutureState.DONE
        return self._state

    @property
    def request_id(self) -> str | None:
        """The trainer's id of the (first) request, once acknowledged."""
        return self._request_ids[0] if self._request_ids else None

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The trainer's ids of every request of this call (one per chunk)."""
        return tuple(self._request_ids)

    @property
    def deadline(self) -> float | None:
        """The deadline, in the loop's clock (``loop.time()``, monotonic), or None."""
        return self._deadline

    @property
    def kind(self) -> str:
        """The operation, e.g. ``"optim_step"``."""
        return self._kind

    def done(self) -> bool:
        """Return True once the future has a result, an exception, or was cancelled."""
        return self._future.done()

    def cancelled(self) -> bool:
        """Return True if the future was cancelled."""
        return self._future.cancelled()

    def cancel(self) -> bool:
        """Abandon the request.

        A request that was not sent yet is removed from the send queue and never
        sent. A sent request keeps running on the trainer, but is no longer polled.
        Later calls on the same client are not affected either way.

        Returns:
            True if the future was cancelled; False if it had already finished.
        """
        return self._future.cancel()

    def exception(self) -> BaseException | None:
        """Return the future's exception, or None if it succeeded.

        Raises:
            asyncio.CancelledError: The future was cancelled.
            asyncio.InvalidStateError: The future is not done yet.
        """
        return self._future.exception()

    def result(self) -> T:
        """Return the result of a finished future without waiting.

        Returns:
            The result.

        Raises:
            asyncio.InvalidStateError: The future is not done yet; await it instead.
            asyncio.CancelledError: The future was cancelled.
            FiretitanError: The request failed; see the specific subclasses.
        """
        return self._future.result()

    # The tinker-compatible signature takes a timeout argument.
    async def result_async(self, timeout: float | None = None) -> T:  # noqa: ASYNC109
        """Wait for the result.

        Args:
            timeout: Seconds to wait; None waits until the future resolves. Running out
                of time does not cancel the request.

        Returns:
            The result.

        Raises:
            FutureTimeoutError: ``timeout`` passed first (the request goes on), or the
                future's own deadline passed.
            asyncio.CancelledError: The future was cancelled.
            FiretitanError: The request failed; see the specific subclasses.
        """
        if self._future.done():
            return self._future.result()
        # Each waiter waits on a future of its own, so cancelling or timing out the
        # *waiter* never cancels the request. Unlike asyncio.shield, the waiter is woken
        # directly when the result is set, not by a callback one loop turn later.
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await waiter
                except TimeoutError:
                    if not self._future.done():
                        raise FutureTimeoutError(
                            f"{self._kind} did not finish within {timeout} s (it was not cancelled)"
                        ) from None
        finally:
            # Still listed if this wait ended first (cancelled, timed out).
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return self._future.result()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def add_done_callback(self, fn: Callable[[AsyncAPIFuture[T]], object]) -> None:
        """Schedule ``fn(self)`` on the loop for when the future is done (soon, if it is)."""
        self._future.add_done_callback(lambda _f: fn(self))

    def __repr__(self) -> str:
        ids = f" request_ids={list(self._request_ids)}" if self._request_ids else ""
        return f"<AsyncAPIFuture {self._kind} {self.state.value}{ids}>"

    # ------------------------------------------------------------------ owner API

    def _set_state(self, state: FutureState) -> None:
        if not self._future.done():
            self._state = state

    def _add_request_id(self, request_id: str) -> None:
        self._request_ids.append(request_id)

    def _set_result(self, value: T) -> None:
        if not self._future.done():
            self._future.set_result(value)
            self._wake()

    def _set_exception(self, exc: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(exc)
            self._wake()

    def _wake(self) -> None:
        """Release the `result_async` waiters and run the `_on_settle` callbacks.

        Waiting tasks resume after the callbacks the result scheduled (`_finished`
        first), so owner clean-ups have run by then.
        """
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        settle, self._settle = self._settle, []
        for fn in settle:
            try:
                fn(self)
            except Exception as exc:
                self._loop.call_exception_handler(
                    {"message": f"settle callback of {self!r} failed", "exception": exc}
                )

    def _on_settle(self, fn: Callable[[AsyncAPIFuture[T]], object]) -> None:
        """Call ``fn(self)`` as soon as the future is resolved, in the same turn of the
        loop rather than the next one as done-callbacks are (at once if it is done).

        For the blocking facade, whose waiting thread ``fn`` releases: a turn of a busy
        loop is a noticeable part of a small call. ``fn`` runs on the loop thread inside
        whatever resolved the future; it must be short and not block.
        """
        if self._future.done():
            fn(self)
        else:
            self._settle.append(fn)

    def _on_finish(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (owner clean-up) when the future resolves, however it does."""
        if self._future.done():
            self._loop.call_soon(fn)
        else:
            self._cleanups.append(fn)

    def _expire(self, seconds: float) -> None:
        self._set_exception(
            FutureTimeoutError(f"{self._kind} did not finish within its {seconds} s deadline")
        )

    def _finished(self, future: asyncio.Future[T]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Mark a failure as retrieved: an abandoned future must not produce a
        # "Future exception was never retrieved" report at garbage collection.
        if not future.cancelled():
            future.exception()
        self._wake()  # a cancellation reaches the waiters only here
        cleanups, self._cleanups = self._cleanups, []
        for fn in cleanups:
            try:
                fn()
            except Exception as exc:  # as asyncio reports a failing done-callback
                self._loop.call_exception_handler(
                    {"message": f"clean-up of {self!r} failed", "exception": exc}
                )


def resolve_deadline(deadline: float | None, config: ClientConfig) -> float | None:
    """The seconds a new future may take: ``deadline``, or the configured default.

    ``math.inf`` means no deadline.

    Raises:
        ValueError: ``deadline`` is not a positive number.
    """
    if deadline is None:
        return config.future_deadline
    seconds = positive_number(deadline, "deadline")
    return None if math.isinf(seconds) else seconds
