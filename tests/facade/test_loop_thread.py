"""P1 and P5: blocking on the loop thread raises; done-callbacks run on the loop thread."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import pytest

from firetitan import APIFuture, BlockingCallInLoopError, FiretitanTrainingClient

from .conftest import datum


def run_in_callback(fut: APIFuture[Any], fn: Any) -> list[BaseException | object]:
    """Run `fn()` inside a done-callback of `fut`; return [its exception or result]."""
    outcome: list[BaseException | object] = []
    finished = threading.Event()

    def callback(_: APIFuture[Any]) -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)
        finally:
            finished.set()

    fut.add_done_callback(callback)
    assert finished.wait(10), "the done-callback never ran"
    return outcome


def test_blocking_client_call_in_done_callback_raises(training: FiretitanTrainingClient) -> None:
    fut = training.forward([datum()], "cross_entropy")
    (error,) = run_in_callback(fut, training.list_checkpoints)
    assert isinstance(error, BlockingCallInLoopError)
    message = str(error)
    assert "FiretitanTrainingClient.list_checkpoints()" in message
    assert "await AsyncFiretitanTrainingClient.list_checkpoints" in message
    # The loop survived the refusal: the client still works.
    assert training.list_checkpoints() == []


def test_waiting_on_a_pending_future_in_done_callback_raises(toy_service: Any) -> None:
    tc = toy_service.create_training_client("p1")
    slow = tc.step("slow", delay=30)
    quick = tc.fail("boom")  # finishes at once, while `slow` is pending
    (error,) = run_in_callback(quick, slow.result)
    assert isinstance(error, BlockingCallInLoopError)
    assert "APIFuture.result()" in str(error)
    (error,) = run_in_callback(quick, slow.exception)
    assert isinstance(error, BlockingCallInLoopError)
    slow.cancel()


def test_reading_a_finished_future_in_its_callback_is_fine(
    training: FiretitanTrainingClient,
) -> None:
    fut = training.forward([datum()], "cross_entropy")
    (output,) = run_in_callback(fut, fut.result)
    assert output is fut.result()


def test_close_and_construction_on_loop_thread_raise(toy: ModuleType, toy_service: Any) -> None:
    tc = toy_service.create_training_client("p1-close")
    fut = tc.step("a")
    (error,) = run_in_callback(fut, toy_service.close)
    assert isinstance(error, BlockingCallInLoopError)
    assert "`await AsyncToyService.aclose(...)`" in str(error)
    (error,) = run_in_callback(fut, lambda: toy.ToyService("http://toy.invalid"))
    assert isinstance(error, BlockingCallInLoopError)
    assert "`async with AsyncToyService(...)`" in str(error)
    assert toy_service.current_user() == "anonymous"  # refused, not half-done: still open


def test_rpc_calls_from_a_callback_are_allowed(toy_service: Any) -> None:
    """Submitting (non-blocking) from a callback works; only waiting is refused."""
    tc = toy_service.create_training_client("p1-chain")
    chained: list[APIFuture[str]] = []
    first = tc.step("first")
    run_in_callback(first, lambda: chained.append(tc.step("second")))
    assert chained[0].result(10) == "second"
    assert tc.log == ["first", "second"]


def test_done_callbacks_run_on_the_loop_thread(training: FiretitanTrainingClient) -> None:
    names: list[str] = []
    seen = threading.Event()

    def record(_: APIFuture[Any]) -> None:
        names.append(threading.current_thread().name)
        if len(names) == 3:
            seen.set()

    pending = training.forward([datum()], "cross_entropy")
    pending.add_done_callback(record)
    done = training.forward([datum()], "cross_entropy")
    done.result()
    done.add_done_callback(record)  # already finished: still run on the loop thread
    cancelled = training.forward([datum()], "cross_entropy")
    cancelled.cancel()  # cancelled from this thread: the callback still runs on the loop
    cancelled.add_done_callback(record)
    assert seen.wait(10)
    assert names == ["firetitan-loop"] * 3


def test_a_failing_callback_is_logged_and_harmless(
    training: FiretitanTrainingClient, caplog: pytest.LogCaptureFixture
) -> None:
    fut = training.forward([datum()], "cross_entropy")

    def explode(_: APIFuture[Any]) -> None:
        raise RuntimeError("callback bug")

    fut.add_done_callback(explode)
    fut.result()
    ran = threading.Event()
    fut.add_done_callback(lambda _: ran.set())
    assert ran.wait(10)
    assert training.forward([datum()], "cross_entropy").result() is not None
