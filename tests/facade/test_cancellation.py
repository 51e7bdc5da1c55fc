"""P6: giving up on a wait (timeout, Ctrl-C) cancels the work instead of leaving it running.

A cancelled request never stalls the calls made after it. A request still queued in the
client is never sent; one already sent is no longer polled.
"""

from __future__ import annotations

import concurrent.futures
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import firetitan._blocking_future
import firetitan._portal
from firetitan import APIFuture, FiretitanServiceClient, FutureTimeoutError
from firetitan.local import LocalTrainer

from .conftest import BASE_MODEL, FAST, SlowEngine, datum, wait_until

FACADE_FILES = {firetitan._blocking_future.__file__, firetitan._portal.__file__}


def main_thread_is_waiting() -> bool:
    """Whether the main thread is blocked in a wait of the facade (not any other wait)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None or frame.f_code.co_filename != threading.__file__:
        return False
    while frame is not None:
        if frame.f_code.co_filename in FACADE_FILES:
            return True
        frame = frame.f_back
    return False


def interrupt_main_when_waiting() -> threading.Thread:
    """Send SIGINT to the main thread once it blocks, as Ctrl-C would."""

    def interrupt() -> None:
        wait_until(main_thread_is_waiting, what="the main thread to block")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


def handed_over(fut: APIFuture[Any]) -> None:
    """Wait until the loop has handed the call to the async client (it is running there)."""
    wait_until(lambda: fut._source is not None, what="the call to reach the client")


def test_result_timeout_cancels_the_request(toy_service: Any) -> None:
    tc = toy_service.create_training_client("timeout")
    slow = tc.step("slow", delay=30)
    after = tc.step("after")
    handed_over(slow)
    with pytest.raises(FutureTimeoutError) as info:
        slow.result(timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    assert slow.cancelled()
    wait_until(lambda: "abandoned:slow" in tc.log, what="the step to be abandoned")
    assert after.result(10) == "after"  # the cancelled call did not stall the next one
    assert tc.log == ["abandoned:slow", "after"]


def test_cancelling_a_queued_request_unsends_it(toy_service: Any) -> None:
    tc = toy_service.create_training_client("queued")
    first = tc.step("first", delay=0.3)
    queued = tc.step("queued")
    last = tc.step("last")
    handed_over(queued)  # from now on it sits in the client's queue, behind `first`
    assert queued.cancel()
    assert last.result(10) == "last"
    assert first.result(10) == "first"
    assert tc.log == ["first", "dropped:queued", "last"]
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()


def test_cancelling_many_calls_in_flight_loses_and_stalls_nothing(toy_service: Any) -> None:
    tc = toy_service.create_training_client("many")
    futures = [tc.step(f"s{i}") for i in range(50)]
    # Cancelled at every stage: before the loop made the call, queued in the client,
    # or running. None of them may hold up or swallow the calls that were not cancelled.
    cancelled = {i for i in range(10, 50, 2) if futures[i].cancel()}
    assert tc.step("end").result(10) == "end"
    executed = [entry for entry in tc.log if ":" not in entry]
    assert executed[-1] == "end"
    assert len(executed) == len(set(executed))  # nothing ran twice
    for i, fut in enumerate(futures):
        if i not in cancelled:
            assert fut.result(10) == f"s{i}"
            assert f"s{i}" in executed


def test_cancelling_the_concurrent_future_cancels_the_request(toy_service: Any) -> None:
    tc = toy_service.create_training_client("cf-cancel")
    slow = tc.step("slow", delay=30)
    handed_over(slow)
    assert slow.future().cancel()
    wait_until(lambda: "abandoned:slow" in tc.log, what="the step to be abandoned")
    assert slow.cancelled()


def test_ctrl_c_while_waiting_for_a_future_cancels_it(toy_service: Any) -> None:
    tc = toy_service.create_training_client("ctrl-c")
    slow = tc.step("slow", delay=30)
    handed_over(slow)
    interrupter = interrupt_main_when_waiting()
    with pytest.raises(KeyboardInterrupt):
        slow.result()
    interrupter.join(10)
    assert slow.cancelled()
    wait_until(lambda: "abandoned:slow" in tc.log, what="the step to be abandoned")
    assert tc.step("next").result(10) == "next"


def test_ctrl_c_during_a_blocking_call_cancels_the_coroutine(toy_service: Any) -> None:
    interrupter = interrupt_main_when_waiting()
    with pytest.raises(KeyboardInterrupt):
        toy_service.sleep(30)
    interrupter.join(10)
    wait_until(
        lambda: getattr(toy_service._inner, "cancelled_sleeps", 0) == 1,
        what="the coroutine to be cancelled",
    )
    assert toy_service.current_user() == "anonymous"  # the portal is fine


@pytest.fixture(scope="module")
def slow_trainer() -> Iterator[tuple[LocalTrainer, SlowEngine]]:
    engine = SlowEngine()
    with LocalTrainer(engine, **FAST) as trainer:
        yield trainer, engine
        engine.release.set()


def test_timeout_on_a_real_request_cancels_it_and_later_calls_go_on(
    slow_trainer: tuple[LocalTrainer, SlowEngine],
) -> None:
    trainer, engine = slow_trainer
    with FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key) as service:
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        stuck = tc.forward_backward([datum()], "cross_entropy")
        assert engine.started.wait(10)
        with pytest.raises(FutureTimeoutError):
            stuck.result(timeout=0.2)
        assert stuck.cancelled()
        wait_until(lambda: stuck._source is not None and stuck._source.cancelled())
        later = tc.forward([datum()], "cross_entropy")
        engine.release.set()  # the trainer finishes the abandoned request, then this one
        assert later.result(30).loss_fn_outputs
