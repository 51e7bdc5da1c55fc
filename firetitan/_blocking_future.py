"""`APIFuture`: the facade's future, usable from blocking code and from any event loop.

An `APIFuture` stands for one request that the async core runs on the firetitan loop thread
(see `firetitan._portal`). Its outcome lives in a `concurrent.futures.Future`, the
*carrier*, which the loop thread completes; everything else is a view of the carrier:

* `result()`/`exception()` block the calling thread on the carrier;
* `await fut` / `await fut.result_async()` wrap the carrier into the *caller's* running loop
  with `asyncio.wrap_future`, so any loop works, including short-lived `asyncio.run` loops;
* `future()` hands out the carrier itself.

Cancellation flows one way, from the carrier to the work: whoever cancels the carrier (this
class, a `concurrent.futures` user of `future()`, or an asyncio task awaiting it) makes the
loop cancel the async core's future, which stops polling the trainer and, if the request
was still queued in the client, never sends it. The carrier relays its own `cancel()`
(`_Carrier`), which costs nothing on the way of a result, unlike a done-callback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from firetitan._errors import FutureTimeoutError

__all__ = ["APIFuture", "AsyncFutureLike", "PortalLike", "RPCCall", "copy_outcome"]

# Skipped when a warning points at the caller's line (see firetitan._portal).
_FACADE_INTERNAL = True

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class PortalLike(Protocol):
    """What a future uses of the portal (`firetitan._portal.Portal`) that made it;
    named here, not imported, so that the two modules do not import each other."""

    def check_alive(self) -> None: ...

    def check_blocking_wait(self, what: str) -> None: ...

    def release_at_turn_end(self, release: Callable[[], object]) -> None: ...

    def cancel_soon(self, cancel: Callable[[], object]) -> None: ...

    def run_callback(
        self,
        fn: Callable[[APIFuture[Any]], object],
        fut: APIFuture[Any],
        _carrier: concurrent.futures.Future[Any],
    ) -> None: ...


class RPCCall(NamedTuple):
    """A facade RPC call to make on the loop thread: the async core's method, its
    arguments, and the conversion of its future's result (None keeps it as it is)."""

    fn: Callable[..., AsyncFutureLike[Any]]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    convert: Callable[[Any], Any] | None


class AsyncFutureLike(Protocol[_T_co]):
    """What the facade uses of the async core's future (`AsyncAPIFuture`).

    Every method is called on the loop thread only.
    """

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def cancel(self) -> bool: ...

    def exception(self) -> BaseException | None: ...

    def result(self) -> _T_co: ...

    def result_async(self) -> Coroutine[Any, Any, _T_co]: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


class _Carrier(concurrent.futures.Future[_T]):
    """The concurrent future that holds an `APIFuture`'s outcome, and relays its own
    cancellation to the async core's future once the loop has linked one."""

    def __init__(self) -> None:
        super().__init__()
        # Set on the loop thread by `APIFuture._link`: schedules `source.cancel()` there.
        self.relay: Callable[[], object] | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        relay = self.relay
        if relay is not None:
            relay()
        # Otherwise the request was not linked yet: `_link` (or `_begin`) sees the
        # cancellation when it runs, since it checks after publishing `relay`.
        return True


class APIFuture(Generic[_T]):
    """The eventual result of a request to the trainer.

    RPC methods of the blocking clients return an `APIFuture` at once; the request is
    already on its way (in call order) and the trainer works while you do something else.

    ```python
    fb = training_client.forward_backward(datums, "cross_entropy")
    opt = training_client.optim_step(adam)      # pipelined behind fb
    fb.result(); opt.result()
    ```

    It can also be awaited from any event loop (`await fut` or `await fut.result_async()`)
    and handed to `concurrent.futures` code through `future()`.

    Giving up cancels the request: when `result()`, `exception()` or `result_async()` time
    out, or the wait is interrupted (Ctrl-C, or the awaiting task is cancelled), the
    request is cancelled before the error propagates. Cancelling stops waiting for the
    trainer; a request still queued in the client is never sent.

    Instances are created by the clients, never directly. They are safe to share between
    threads.
    """

    __slots__ = ("__weakref__", "_carrier", "_portal", "_source")

    def __init__(self, portal: PortalLike) -> None:
        self._portal = portal
        self._carrier: _Carrier[_T] = _Carrier()
        # The async core's future, set on the loop thread once the request was handed to
        # the async client; `None` while still queued, or if it never started.
        self._source: AsyncFutureLike[Any] | None = None

    # -- linking (loop thread only) -------------------------------------------------------

    def _begin(self, call: RPCCall) -> None:
        """Make the queued RPC call and follow its async future (loop thread)."""
        if self._carrier.cancelled():
            return  # cancelled while still queued: the request is never made
        try:
            source = call.fn(*call.args, **call.kwargs)
        except Exception as exc:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self._carrier.set_exception(exc)  # unless cancelled meanwhile
            return
        self._link(source, call.convert)

    def _link(self, source: AsyncFutureLike[Any], convert: Callable[[Any], _T] | None) -> None:
        """Mirror `source` into the carrier, and a cancelled carrier into `source`.

        Called on the loop thread. A carrier cancelled from another thread after this
        has `Portal.cancel_soon` schedule `source.cancel()` on the loop; one cancelled
        before it, found cancelled here, is relayed at once.
        """
        self._source = source
        carrier = self._carrier
        carrier.relay = functools.partial(self._portal.cancel_soon, source.cancel)
        if carrier.cancelled():
            source.cancel()
            return
        copy = functools.partial(copy_outcome, carrier, convert)
        # The async core's futures run this as they resolve, one turn of the loop sooner
        # than a done-callback would; the copy itself, which wakes the waiting thread,
        # waits for the end of that turn (`Portal.release_at_turn_end`).
        on_settle = getattr(source, "_on_settle", None)
        if on_settle is not None:
            release = self._portal.release_at_turn_end
            on_settle(lambda settled: release(functools.partial(copy, settled)))
        else:
            source.add_done_callback(copy)

    # -- state ----------------------------------------------------------------------------

    def done(self) -> bool:
        """Return whether the request finished (successfully, with an error, or cancelled)."""
        return self._carrier.done()

    def cancelled(self) -> bool:
        """Return whether the request was cancelled."""
        return self._carrier.cancelled()

    @property
    def request_id(self) -> str | None:
        """The trainer's request id, once the request was submitted; else `None`."""
        return getattr(self._source, "request_id", None)

    def cancel(self) -> bool:
        """Cancel the request.

        Returns at once; the cancellation reaches the request on the loop thread shortly
        after. A request still queued in the client is never sent; one already sent is
        no longer waited for (the trainer may still execute it).

        Returns:
            True if the future was pending and is now cancelled; False if it had already
            finished.
        """
        return self._carrier.cancel()

    # -- blocking access ------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> _T:
        """Wait for the request and return its result.

        Args:
            timeout: Seconds to wait; `None` waits as long as it takes.

        Returns:
            The request's result.

        Raises:
            FutureTimeoutError: The request did not finish within `timeout` seconds; it
                was cancelled (also a builtin `TimeoutError`).
            concurrent.futures.CancelledError: The request was cancelled.
            BlockingCallInLoopError: Called on the firetitan loop thread (for example in
                a done-callback) while the request is still pending: waiting there would
                deadlock.
            ClientUsageError: The future is pending and was inherited through fork():
                nothing in this process will ever finish it.
            Exception: Whatever the request failed with (for example
                `RequestFailedError` or an `APIStatusError`).
        """
        self._wait(timeout, "result")
        return self._carrier.result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the request and return the exception it failed with, if any.

        Args:
            timeout: Seconds to wait; `None` waits as long as it takes.

        Returns:
            The exception, or `None` if the request succeeded.

        Raises:
            FutureTimeoutError: The request did not finish within `timeout` seconds; it
                was cancelled.
            concurrent.futures.CancelledError: The request was cancelled.
            BlockingCallInLoopError: Called on the firetitan loop thread while the request
                is still pending.
        """
        self._wait(timeout, "exception")
        return self._carrier.exception()

    def _wait(self, timeout: float | None, method: str) -> None:
        """Block until the carrier is done, cancelling the request if the wait gives up."""
        carrier = self._carrier
        if carrier.done():
            # Reading a finished future never blocks, so it is fine anywhere, including in
            # a done-callback on the loop thread (the common `lambda f: f.result()`).
            return
        self._portal.check_blocking_wait(f"APIFuture.{method}()")
        try:
            # `exception()` waits without raising the request's own error, so the
            # `TimeoutError` caught here can only be the wait's.
            carrier.exception(timeout)
        except TimeoutError:
            if self.cancel():
                raise FutureTimeoutError(
                    f"the request did not finish within {timeout} s and was cancelled"
                ) from None
            # It finished in the instant between the timeout and the cancel: use it.
        except concurrent.futures.CancelledError:
            pass  # the caller re-reads the carrier, which raises it again
        except BaseException:
            # KeyboardInterrupt (or another asynchronous exception) while waiting: the
            # caller gave up on the request, so do not leave it running on the trainer.
            self.cancel()
            raise

    # -- callbacks --------------------------------------------------------------------------

    def add_done_callback(self, fn: Callable[[APIFuture[_T]], object]) -> None:
        """Call `fn(self)` when the request finishes.

        Callbacks run on the firetitan event-loop thread, which every client in the
        process shares: keep them short, and never call a blocking method in them (a
        blocking client method, or `result()` of a future that is not done yet, raises
        `BlockingCallInLoopError` there instead of deadlocking). Reading this future's own
        result inside the callback is fine. An exception raised by a callback is logged
        and otherwise ignored.

        Args:
            fn: A callable taking this future.
        """
        self._carrier.add_done_callback(functools.partial(self._portal.run_callback, fn, self))

    def future(self) -> concurrent.futures.Future[_T]:
        """Return the `concurrent.futures.Future` that carries this request's outcome.

        For code that works with standard futures (`concurrent.futures.wait`,
        `as_completed`, ...). Cancelling it cancels the request. Its own done-callbacks
        run on the thread that completes it, usually the firetitan loop thread.

        Returns:
            The carrier future.
        """
        return self._carrier

    # -- async access -------------------------------------------------------------------------

    async def result_async(self, timeout: float | None = None) -> _T:  # noqa: ASYNC109
        """`result` for async code: wait from any event loop, without blocking it.

        It takes, returns and raises what `result` does, except that a cancelled
        request, or a cancelled awaiting task (which cancels the request too), raises
        ``asyncio.CancelledError``, and that it may run on any loop.
        """
        if not self._carrier.done():
            self._portal.check_alive()  # an inherited or orphaned future never finishes
        # wrap_future chains both ways: the carrier's outcome is delivered into the
        # caller's loop, and cancelling the wrapper (task cancellation) cancels the carrier.
        wrapper = asyncio.wrap_future(self._carrier)
        if timeout is None:
            return await wrapper
        done, _ = await asyncio.wait((wrapper,), timeout=timeout)
        if not done:
            wrapper.cancel()
            if self.cancel():
                raise FutureTimeoutError(
                    f"the request did not finish within {timeout} s and was cancelled"
                )
            # Finished at the last moment: its outcome is in the carrier already.
            return self._carrier.result()
        return wrapper.result()

    def __await__(self) -> Generator[Any, None, _T]:
        return self.result_async().__await__()

    async def coroutine(self) -> _T:
        """Return this future as a coroutine, for APIs that need one (`asyncio.create_task`).

        Returns:
            The request's result.
        """
        return await self.result_async()

    def __repr__(self) -> str:
        carrier = self._carrier
        if carrier.cancelled():
            state = "cancelled"
        elif not carrier.done():
            state = "pending"
        elif carrier.exception() is not None:
            state = f"failed: {type(carrier.exception()).__name__}"
        else:
            state = "finished"
        rid = self.request_id
        return f"<APIFuture {state}{'' if rid is None else f' request_id={rid}'}>"


def copy_outcome(
    carrier: concurrent.futures.Future[Any],
    convert: Callable[[Any], Any] | None,
    source: AsyncFutureLike[Any],
) -> None:
    """Copy a finished async future's outcome into the carrier (loop thread)."""
    if carrier.done():
        return  # cancelled through the carrier; the cancel was relayed to `source`
    try:
        if source.cancelled():
            carrier.cancel()
            return
        exc = source.exception()
        if exc is None:
            try:
                value = source.result()
                if convert is not None:
                    value = convert(value)
            except Exception as error:  # never leave the carrier pending: that is a hang
                exc = error
            else:
                carrier.set_result(value)
                return
        carrier.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled from another thread between the check and the set: cancel wins
