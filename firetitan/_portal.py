"""The facade runtime: one background event-loop thread that runs the async core.

The blocking clients in `firetitan._sync` own no I/O of their own. Each holds an async
client (`firetitan._async`) that lives on one process-wide event loop, run forever by a
daemon thread that starts on first use. The facade reaches that loop in three ways:

* `Portal.call` runs a coroutine function there and blocks for its result;
* `Portal.start` runs a plain RPC method (one that submits a request and returns the
  async core's future at once) there and returns an `APIFuture` *without* waiting for the
  loop: the call joins the portal's FIFO inbox, so the calls of any one thread reach the
  async client in the order they were made. Only the first call of a burst wakes the
  loop (`loop.call_soon_threadsafe`); calls made before the loop took the inbox ride
  along without another wake-up;
* `Portal.construct`/`Portal.open` build async clients *on* the loop, because aiohttp
  binds its objects to the loop that is running when they are created.

Invariants and guards (one test each in `tests/facade/`):

* Blocking on the loop thread would wait for work only that thread can do, so `call` and a
  pending `APIFuture.result()` raise `BlockingCallInLoopError` there instead.
* A blocking call made from inside *another* running event loop (an `async def`, Jupyter)
  works, because the work runs on this thread, but it stalls the caller's loop; it emits a
  `RuntimeWarning` once per call site (Python's default warning filter), except under an
  IPython kernel, where blocking a cell is what the user expects.
* The caller's `contextvars` reach the loop: every hop runs in a copy of the caller's
  context, and tasks the async core starts there inherit it.
* fork: the child inherits the portal object but not its thread. A fork hook retires the
  inherited portal, so the child's first new client starts a fresh one, and objects made
  before the fork raise `ClientUsageError` instead of waiting forever on a dead loop.
* Exit: an `atexit` hook closes the async clients still alive (tracked by weak references,
  newest first), then stops the loop and joins the thread, each step bounded in time. The
  thread is a daemon so that a wedged loop can never hang interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import selectors
import sys
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from firetitan._blocking_future import APIFuture, AsyncFutureLike, RPCCall
from firetitan._errors import BlockingCallInLoopError, ClientClosedError, ClientUsageError

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = ["Portal", "get_portal", "register_twin", "rewrap", "shutdown", "wrap_twin"]

_logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_R = TypeVar("_R")
_C = TypeVar("_C")
_O = TypeVar("_O", bound="_AsyncOpenable")

# Frames of modules that set this flag are skipped when a warning points at the caller's
# line; generated facade modules set it too.
_FACADE_INTERNAL = True

#: Seconds the exit hook gives the live clients, all together, to close.
EXIT_CLOSE_TIMEOUT_S = 10.0
#: Seconds the exit hook waits for the loop thread to finish after the clients closed.
EXIT_JOIN_TIMEOUT_S = 5.0
#: Seconds the stopping loop gives its remaining tasks to finish after cancelling them.
_DRAIN_TIMEOUT_S = 2.0


class _AsyncOpenable(Protocol):
    def __aenter__(self) -> Awaitable[Any]: ...


#: A `Portal.start` call waiting in the inbox: its future, the call, and the caller's
#: context.
_Started = tuple[APIFuture[Any], RPCCall, contextvars.Context]


class Portal:
    """An event loop running forever in a daemon thread, shared by every facade object.

    Use `get_portal()`; never construct one directly.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        # False once the portal was retired (after fork, in the child) or shut down. Read
        # on every facade call, so it is a plain attribute rather than an os.getpid() call.
        self._usable = True
        self._forked = False
        self._stopping = False
        self._releases = _TurnEndReleases(selectors.DefaultSelector())
        self._loop = asyncio.SelectorEventLoop(self._releases)
        # `start` calls waiting for the loop, and whether a `_take_inbox` is scheduled.
        # Callers append and then read the flag; the loop clears the flag and then
        # empties the inbox: under the GIL, every call is either taken by a scheduled
        # run or schedules one itself.
        self._inbox: collections.deque[_Started] = collections.deque()
        self._inbox_scheduled = False
        # Async clients that need `aclose()` at exit, by id, in creation order. Weak, so
        # that tracking never keeps a client alive. Callers add and remove entries from any
        # thread, so changes and the exit hook's snapshot take the lock (the dictionary's
        # own weakref callbacks are safe without it).
        self._clients: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._clients_lock = threading.Lock()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="firetitan-loop", daemon=True
        )
        self._thread.start()
        started.wait()
        self._thread_id = self._thread.ident

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that runs the async core."""
        return self._loop

    def on_loop_thread(self) -> bool:
        """Return whether the caller runs on this portal's loop thread."""
        return threading.get_ident() == self._thread_id

    # -- the loop thread ----------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            while not self._stopping:
                try:
                    loop.run_forever()
                except BaseException:
                    # A callback raised SystemExit or KeyboardInterrupt, which asyncio lets
                    # escape run_forever. Every client in the process depends on this loop,
                    # so log it and keep serving.
                    _logger.exception("firetitan event loop: a callback raised; loop continues")
        finally:
            try:
                self._releases.flush()
                self._drain()
            finally:
                self._releases.flush()
                loop.close()

    def _drain(self) -> None:
        """Cancel what is left on the stopped loop and let it unwind (bounded)."""
        loop = self._loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT_S))
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    # Retrieved so that nothing logs "exception was never retrieved" later.
                    _logger.debug("task failed while stopping", exc_info=task.exception())
        loop.run_until_complete(loop.shutdown_asyncgens())
        try:
            loop.run_until_complete(
                asyncio.wait_for(loop.shutdown_default_executor(), _DRAIN_TIMEOUT_S)
            )
        except TimeoutError:
            _logger.debug("default executor did not stop in time; abandoned")

    def release_at_turn_end(self, release: Callable[[], object]) -> None:
        """Run ``release`` (loop thread) once the loop has run this turn's callbacks.

        For outcomes that wake a blocked thread: woken mid-turn, that thread would only
        wait again, for the GIL, until the loop thread blocks; woken at the turn's end,
        it finds the GIL free.
        """
        self._releases.add(release)

    # -- guards ---------------------------------------------------------------------------

    def _raise_unusable(self) -> None:
        if self._forked or self.pid != os.getpid():
            raise ClientUsageError(
                f"this firetitan object was created in process {self.pid} and cannot be used "
                f"in process {os.getpid()}, which was forked from it: the event-loop thread "
                "that runs its requests exists only in the parent. Create a new client in the "
                "child process (or start workers with the 'spawn' method)."
            )
        raise ClientClosedError(
            "firetitan's event-loop thread has shut down (at interpreter exit, or by "
            "firetitan._portal.shutdown()); this object can make no further requests"
        )

    def check_alive(self) -> None:
        """Raise unless this portal can still run work in this process.

        Raises:
            ClientUsageError: This process was forked after the portal started.
            ClientClosedError: The portal has shut down.
        """
        if not self._usable or self.pid != os.getpid():
            self._raise_unusable()

    def _check_blocking(self, target: object) -> None:
        """Refuse to block the loop thread; warn when blocking another running loop."""
        self.check_alive()
        running = asyncio._get_running_loop()
        if running is None:
            return
        facade_name, async_hint = _describe(target)
        if running is self._loop:
            raise BlockingCallInLoopError(
                f"{facade_name} blocks until the firetitan event loop finishes it, but it was "
                "called on that loop's own thread (for example in a done-callback), where "
                f"it would deadlock. Call it from another thread, or use {async_hint} in "
                "async code."
            )
        _warn_blocking_in_running_loop(
            f"{facade_name} blocks this thread, which is running an event loop that stalls "
            f"until it returns; in async code use {async_hint} instead"
        )

    def check_blocking_wait(self, what: str) -> None:
        """The guard for waiting on a pending `APIFuture` (`what` names the method).

        Raises:
            BlockingCallInLoopError: Called on the loop thread.
            ClientUsageError: The future was inherited through fork(): nothing in this
                process will ever finish it.
            ClientClosedError: The portal shut down before the future finished.
        """
        self.check_alive()
        if self.on_loop_thread():
            raise BlockingCallInLoopError(
                f"{what} on a pending future was called on the firetitan event-loop thread "
                "(for example in a done-callback), which is the thread that must finish the "
                "future, so it would deadlock. In a callback, read only futures that are "
                "done, or chain another callback; in async code use `await fut`."
            )
        if asyncio._get_running_loop() is not None:
            _warn_blocking_in_running_loop(
                f"{what} blocks this thread, which is running an event loop that stalls "
                "until it returns; in async code use `await fut` instead"
            )

    # -- running work on the loop ------------------------------------------------------------

    def call(self, fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run `fn(*args, **kwargs)` on the loop and block until it finishes.

        Args:
            fn: A coroutine function (usually a bound method of an async client).
            *args: Its positional arguments.
            **kwargs: Its keyword arguments.

        Returns:
            What the coroutine returned.

        Raises:
            BlockingCallInLoopError: Called on the loop thread.
            ClientUsageError: Called in a process forked after this portal started.
            ClientClosedError: The portal has shut down.
            BaseException: Whatever `fn` raised. If the wait is interrupted (Ctrl-C), the
                coroutine is cancelled before the interruption propagates.
        """
        self._check_blocking(fn)
        return self._wait(self._schedule(fn, args, kwargs))

    def submit(
        self, fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        """Run `fn(*args, **kwargs)` on the loop without waiting.

        Returns:
            A `concurrent.futures.Future` of its result; cancelling it cancels the task.

        Raises:
            ClientUsageError: Called in a process forked after this portal started.
            ClientClosedError: The portal has shut down.
        """
        if not self._usable:
            self._raise_unusable()
        return self._schedule(fn, args, kwargs)

    def start(
        self, fn: Callable[_P, AsyncFutureLike[_T]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> APIFuture[_T]:
        """Call a plain RPC method on the loop and return its future at once.

        `fn` submits a request and returns the async core's future; it must run on the
        loop. This does not wait for the loop: the call is queued (FIFO, so calls keep
        their per-thread order) and the returned `APIFuture` follows the async future once
        the loop has made the call. An error raised by `fn` itself is delivered through
        the returned future.

        Raises:
            ClientUsageError: Called in a process forked after this portal started.
            ClientClosedError: The portal has shut down.
        """
        return self._start(RPCCall(fn, args, kwargs, None))

    def start_as(
        self,
        convert: Callable[[_R], _T],
        fn: Callable[_P, AsyncFutureLike[_R]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> APIFuture[_T]:
        """Like `start`, with `convert` applied to the result (on the loop thread)."""
        return self._start(RPCCall(fn, args, kwargs, convert))

    def call_future(
        self,
        fn: Callable[_P, Awaitable[AsyncFutureLike[_T]]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> APIFuture[_T]:
        """Run a coroutine function that returns an async future; block until it returns.

        For `async def` methods that do some work (say, a forward pass) before they submit
        their request and return its future. Blocking guards as for `call`.

        Returns:
            An `APIFuture` that follows the returned async future.
        """
        self._check_blocking(fn)
        source = self._wait(self._schedule(fn, args, kwargs))
        fut: APIFuture[_T] = APIFuture(self)
        # The async future may only be touched on the loop; linking there is one more
        # queued callback, not a round trip.
        self._loop.call_soon_threadsafe(fut._link, source, None)
        return fut

    def _start(self, call: RPCCall) -> APIFuture[Any]:
        if not self._usable:
            self._raise_unusable()
        fut: APIFuture[Any] = APIFuture(self)
        # The context makes the call run in (a copy of) the caller's context, so its
        # contextvars reach the async core and the tasks it starts.
        self._inbox.append((fut, call, contextvars.copy_context()))
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._take_inbox)
            except RuntimeError:  # the loop closed under us (shutdown in another thread)
                self._raise_unusable()
        return fut

    def _take_inbox(self) -> None:
        """Make the queued `start` calls, oldest first (loop thread)."""
        self._inbox_scheduled = False
        inbox = self._inbox
        try:
            while inbox:
                fut, call, context = inbox.popleft()
                context.run(fut._begin, call)
        except BaseException:
            # SystemExit or KeyboardInterrupt from a call: the rest still gets made.
            if inbox and not self._inbox_scheduled:
                self._inbox_scheduled = True
                self._loop.call_soon(self._take_inbox)
            raise

    def _schedule(
        self,
        fn: Callable[..., Awaitable[_T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> concurrent.futures.Future[_T]:
        carrier: concurrent.futures.Future[_T] = concurrent.futures.Future()
        try:
            self._loop.call_soon_threadsafe(
                self._spawn, fn, args, kwargs, carrier, context=contextvars.copy_context()
            )
        except RuntimeError:
            self._raise_unusable()
        return carrier

    def _spawn(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        carrier: concurrent.futures.Future[Any],
    ) -> None:
        """Start the coroutine as a task (loop thread, caller's context)."""
        if carrier.cancelled():
            return  # given up before it started
        try:
            task = asyncio.ensure_future(fn(*args, **kwargs))
        except Exception as exc:
            _set_exception(carrier, exc)
            return
        task.add_done_callback(functools.partial(_copy_task_outcome, carrier))
        carrier.add_done_callback(functools.partial(self.relay_cancel, task.cancel))

    @staticmethod
    def _wait(carrier: concurrent.futures.Future[_T]) -> _T:
        try:
            return carrier.result()
        except BaseException:
            # On Ctrl-C the caller gives up: cancel the work rather than leave it running
            # (a no-op when the carrier finished with the work's own exception).
            carrier.cancel()
            raise

    def relay_cancel(
        self, cancel: Callable[[], object], carrier: concurrent.futures.Future[Any]
    ) -> None:
        """Carrier done-callback: a cancelled carrier calls `cancel()` on the loop."""
        if carrier.cancelled():
            self.cancel_soon(cancel)

    def cancel_soon(self, cancel: Callable[[], object]) -> None:
        """Call `cancel()` on the loop thread, from any thread."""
        # RuntimeError: the loop has closed, so nothing is running any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(cancel)

    def run_callback(
        self,
        fn: Callable[[APIFuture[_T]], object],
        fut: APIFuture[_T],
        _carrier: concurrent.futures.Future[_T],
    ) -> None:
        """Run a user's done-callback on the loop thread, wherever the carrier finished."""
        if self.on_loop_thread():
            fn(fut)
            return
        # Cancelled from another thread, or already done when the callback was added.
        try:
            self._loop.call_soon_threadsafe(fn, fut)
        except RuntimeError:
            fn(fut)  # the loop is gone: run it here rather than never

    # -- async client lifecycle -----------------------------------------------------------

    def construct(self, cls: Callable[_P, _C], /, *args: _P.args, **kwargs: _P.kwargs) -> _C:
        """Build an async client on the loop (aiohttp objects bind to the running loop).

        Raises:
            BlockingCallInLoopError: Called on the loop thread.
        """
        return self._build(_construct, cls, args, kwargs)

    def open(self, cls: Callable[_P, _O], /, *args: _P.args, **kwargs: _P.kwargs) -> _O:
        """Build an async client on the loop and enter it (`__aenter__`: connect).

        If entering fails, the half-built client is closed before the error propagates.

        Raises:
            BlockingCallInLoopError: Called on the loop thread.
        """
        return self._build(_construct_and_enter, cls, args, kwargs)

    def _build(
        self,
        make: Callable[[Callable[..., _T], tuple[Any, ...], dict[str, Any]], Awaitable[_T]],
        cls: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _T:
        """Run ``make(cls, args, kwargs)`` on the loop and track the client it returns."""
        self._check_blocking(cls)
        obj = self._wait(self._schedule(make, (cls, args, kwargs), {}))
        self.track(obj)
        return obj

    def track(self, obj: object) -> None:
        """Have the exit hook close `obj` (if it has `aclose`) unless it was closed first."""
        if hasattr(obj, "aclose"):
            with self._clients_lock:
                self._clients[id(obj)] = obj

    def close(
        self, fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T | None:
        """Run a closing coroutine (`aclose`, `__aexit__`) and stop tracking its client.

        Once the portal is shutting down, this is a no-op: shutdown closes every client.

        Raises:
            BlockingCallInLoopError: Called on the loop thread.
            ClientUsageError: Called in a process forked after this portal started.
        """
        if not self._usable and not self._forked and self.pid == os.getpid():
            return None
        result = self.call(fn, *args, **kwargs)
        with self._clients_lock:
            self._clients.pop(id(getattr(fn, "__self__", None)), None)
        return result

    def shutdown(
        self,
        close_timeout: float = EXIT_CLOSE_TIMEOUT_S,
        join_timeout: float = EXIT_JOIN_TIMEOUT_S,
    ) -> None:
        """Close the tracked clients, stop the loop and join its thread, each bounded.

        Idempotent; a no-op in a forked child (the loop belongs to the parent).
        """
        if not self._usable or self.pid != os.getpid():
            return  # already shutting down, or retired by fork
        if self.on_loop_thread():
            raise BlockingCallInLoopError("the firetitan portal cannot be shut down from its loop")
        self._usable = False
        # Newest first: a sampling client goes before the service client it came from.
        with self._clients_lock:
            clients = list(self._clients.values())[::-1]
        if clients:
            done = self._schedule(_close_all, (clients,), {})
            try:
                done.result(close_timeout)
            except BaseException:
                done.cancel()
                _logger.debug("closing clients at shutdown failed or timed out", exc_info=True)
        self._stopping = True
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            return  # already closed
        self._thread.join(join_timeout)

    def _retire_after_fork(self) -> None:
        """In a forked child: make this inherited portal refuse work, silently."""
        self._usable = False
        self._forked = True
        self._clients = weakref.WeakValueDictionary()
        self._clients_lock = threading.Lock()  # may have been held by a vanished thread
        # Objects inherited from the parent (aiohttp sessions, pending tasks) may be
        # collected in the child and report themselves to their loop's exception handler
        # ("Unclosed client session"). They belong to the parent, which closes them.
        self._loop.set_exception_handler(_ignore_loop_error)


class _TurnEndReleases(selectors.BaseSelector):
    """The portal loop's selector, which also runs the releases queued during a turn.

    An event loop calls its selector's ``select`` between turns, so running the queued
    releases there runs them after every callback of the turn. When the turn leaves more
    work ready (``select`` with a zero timeout), releases wait at most one more turn, so
    a loop that stays busy still releases promptly. Everything else is the wrapped
    selector's (``modify`` and ``get_key`` as `selectors.BaseSelector` builds them on
    these).
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._pending: list[Callable[[], object]] = []
        self._busy_turns = 0

    def add(self, release: Callable[[], object]) -> None:
        self._pending.append(release)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._busy_turns = 0
        for release in pending:
            try:
                release()
            except Exception:  # as a failing done-callback is: logged, never fatal
                _logger.exception("firetitan: releasing a waiting thread failed")

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._pending:
            if timeout is None or timeout > 0 or self._busy_turns:
                self.flush()
            else:
                self._busy_turns += 1
        return self._selector.select(timeout)

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._selector.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._selector.unregister(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._selector.get_map()

    def close(self) -> None:
        self._selector.close()


async def _construct(cls: Callable[..., _C], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _C:
    return cls(*args, **kwargs)


async def _construct_and_enter(
    cls: Callable[..., _O], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _O:
    obj = cls(*args, **kwargs)
    try:
        await obj.__aenter__()
    except BaseException:
        aclose = getattr(obj, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                _logger.debug("closing a client whose opening failed", exc_info=True)
        raise
    return obj


async def _close_all(clients: list[Any]) -> None:
    for client in clients:  # one by one, newest first (see Portal.shutdown)
        try:
            await client.aclose()
        except Exception:
            _logger.debug("closing %r at shutdown failed", type(client).__name__, exc_info=True)


def _copy_task_outcome(carrier: concurrent.futures.Future[Any], task: asyncio.Future[Any]) -> None:
    if carrier.done():
        return  # cancelled through the carrier; the cancel was relayed to the task
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancel wins a race
        if task.cancelled():
            carrier.cancel()
        elif (exc := task.exception()) is not None:
            carrier.set_exception(exc)
        else:
            carrier.set_result(task.result())


def _set_exception(carrier: concurrent.futures.Future[Any], exc: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
        carrier.set_exception(exc)


def _ignore_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    return None


def _describe(target: object) -> tuple[str, str]:
    """Name a blocking facade call and its async alternative, from the async callable.

    For the bound method `AsyncFiretitanTrainingClient.list_checkpoints` these are
    "FiretitanTrainingClient.list_checkpoints()" and
    "`await AsyncFiretitanTrainingClient.list_checkpoints(...)`".
    """
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    if isinstance(target, type):
        facade = qualname.removeprefix("Async")
        return f"{facade}()", f"`async with {qualname}(...)`"
    owner, _, method = qualname.rpartition(".")
    renamed = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}
    facade = f"{owner.removeprefix('Async')}.{renamed.get(method, method)}".lstrip(".")
    return f"{facade}()", f"`await {qualname}(...)`"


def _in_ipython_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    # Jupyter's kernel shell, or a subclass of it (Colab, ...); not the terminal IPython.
    return shell is not None and any(
        cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__
    )


def _warn_blocking_in_running_loop(message: str) -> None:
    if _in_ipython_kernel():
        return
    # Point the warning at the first frame outside the facade, so that the default filter
    # reports it once per line of user code.
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_globals.get("_FACADE_INTERNAL"):
        frame = frame.f_back
        level += 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


# -- the process-wide portal -----------------------------------------------------------------

_lock = threading.Lock()
_current: Portal | None = None
_exiting = False
_atexit_registered = False
# Portals retired by fork in this process, kept alive on purpose (see _retire_after_fork).
_retired: list[Portal] = []


def get_portal() -> Portal:
    """Return the process's portal, starting its loop thread on first use.

    Raises:
        ClientClosedError: The interpreter is exiting.
    """
    global _current, _atexit_registered
    portal = _current
    if portal is not None and portal._usable:
        return portal
    with _lock:
        if _current is None or not _current._usable:
            if _exiting:
                raise ClientClosedError(
                    "the interpreter is exiting; firetitan cannot start new clients"
                )
            _current = Portal()
            if not _atexit_registered:
                atexit.register(_shutdown_at_exit)
                _atexit_registered = True
        return _current


#: Async class -> its facade twin, filled in by each generated facade module as it loads.
_twins: dict[type, Any] = {}


def register_twin(async_cls: type, facade_cls: Any) -> None:
    """Record the facade twin of an async class (called by the generated modules)."""
    _twins[async_cls] = facade_cls


def wrap_twin(portal: Portal, inner: object) -> Any:
    """Wrap an async object made on ``portal`` into its facade twin.

    Generated facade modules wrap the classes of sibling modules through this lookup
    rather than by importing them, so that no two facade modules import each other.
    """
    for klass in type(inner).__mro__:
        facade = _twins.get(klass)
        if facade is not None:
            return facade._wrap(portal, inner)
    raise TypeError(f"{type(inner).__name__} has no facade twin")


def rewrap(cls: Any, inner: object) -> Any:
    """Unpickle a facade object: wrap its unpickled async object on this process's portal."""
    return cls._wrap(get_portal(), inner)


def shutdown() -> None:
    """Close every tracked client and stop the portal now (bounded); the next use restarts."""
    global _current
    with _lock:
        portal, _current = _current, None
    if portal is not None:
        portal.shutdown()


def _shutdown_at_exit() -> None:
    global _exiting
    _exiting = True
    shutdown()


def _after_fork_in_child() -> None:
    global _current, _lock
    # The parent's lock may have been held by a thread that does not exist here.
    _lock = threading.Lock()
    portal, _current = _current, None
    if portal is not None:
        portal._retire_after_fork()
        _retired.append(portal)


os.register_at_fork(after_in_child=_after_fork_in_child)
