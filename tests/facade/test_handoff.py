"""The portal's hand-offs between caller threads and the loop thread: bursts of calls
share one wake-up and keep their order, results reach a waiting thread even while the
loop never idles, and a cancelled carrier reaches the async future however early or
late it is cancelled."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from firetitan._async.async_future import AsyncAPIFuture
from firetitan._portal import Portal, get_portal

WAIT_S = 30.0  # generous: only a hang would take this long


@pytest.fixture
def portal() -> Portal:
    return get_portal()


def resolved(value: int) -> AsyncAPIFuture[int]:
    future: AsyncAPIFuture[int] = AsyncAPIFuture(kind="noop", deadline=None)
    future._set_result(value)
    return future


@pytest.fixture
def loop_held(portal: Portal) -> Iterator[threading.Event]:
    """Keep the loop thread busy in one callback until the returned event is set."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(WAIT_S)

    portal.loop.call_soon_threadsafe(hold)
    assert holding.wait(WAIT_S)
    try:
        yield release
    finally:
        release.set()


def test_a_burst_made_while_the_loop_is_busy_wakes_it_once_in_order(
    portal: Portal, loop_held: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes: list[Callable[..., Any]] = []
    original = portal.loop.call_soon_threadsafe

    def counted(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        wakes.append(callback)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(portal.loop, "call_soon_threadsafe", counted)
    futures = [portal.start(resolved, i) for i in range(100)]
    monkeypatch.undo()
    assert len(wakes) == 1  # the first call schedules the inbox; the rest ride along
    assert not any(f.done() for f in futures)
    loop_held.set()
    assert [f.result(WAIT_S) for f in futures] == list(range(100))


def test_a_result_reaches_the_waiting_thread_while_the_loop_never_idles(
    portal: Portal,
) -> None:
    # A chain of callbacks that always leaves the next one ready: every turn of the loop
    # ends with more work, so the loop never blocks in select.
    stop = threading.Event()
    turns = [0]

    def spin() -> None:
        turns[0] += 1
        if not stop.is_set():
            portal.loop.call_soon(spin)

    portal.loop.call_soon_threadsafe(spin)
    try:
        assert portal.start(resolved, 7).result(WAIT_S) == 7
        assert not stop.is_set()  # released while the loop was still busy
    finally:
        stop.set()


def test_cancelling_the_carrier_before_the_loop_takes_the_call_never_makes_it(
    portal: Portal, loop_held: threading.Event
) -> None:
    made: list[int] = []

    def call() -> AsyncAPIFuture[int]:
        made.append(1)
        return resolved(1)

    future = portal.start(call)
    assert future.future().cancel()  # through the concurrent future, as its users do
    loop_held.set()
    assert portal.start(resolved, 2).result(WAIT_S) == 2  # the inbox was taken since
    assert made == []
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result()


def test_cancelling_the_carrier_after_the_link_cancels_the_async_future(
    portal: Portal,
) -> None:
    sources: list[AsyncAPIFuture[int]] = []

    def pending() -> AsyncAPIFuture[int]:
        source: AsyncAPIFuture[int] = AsyncAPIFuture(kind="noop", deadline=None)
        sources.append(source)
        return source

    future = portal.start(pending)
    # One round trip through the inbox: the call above has been made and linked.
    assert portal.start(resolved, 0).result(WAIT_S) == 0
    assert future.request_id is None and not future.done()
    assert future.future().cancel()

    async def source_cancelled() -> bool:
        return sources[0].cancelled()

    # The relay is queued on the loop before this call, so it has run by then.
    assert portal.call(source_cancelled)
