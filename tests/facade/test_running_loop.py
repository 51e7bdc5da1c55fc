"""P2 and P3: the facade inside another running event loop, and loop-bound objects.

Blocking facade calls made from a coroutine (an `async def`, Jupyter) work, because the
work runs on the firetitan loop thread; they warn once per call site, except under an
IPython kernel. Facade futures can be awaited from any loop, including short-lived
`asyncio.run` loops. aiohttp objects are born on the firetitan loop, so clients outlive
the loop of whoever created them.
"""

from __future__ import annotations

import asyncio
import sys
import types
import warnings
from typing import Any

import pytest

from firetitan import FiretitanServiceClient, FiretitanTrainingClient, FutureTimeoutError
from firetitan._portal import get_portal
from firetitan.local import LocalTrainer

from .conftest import BASE_MODEL, datum


def test_blocking_call_inside_a_running_loop_works_and_warns(
    service: FiretitanServiceClient,
) -> None:
    async def main() -> FiretitanTrainingClient:
        with pytest.warns(RuntimeWarning) as record:
            tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        (warning,) = record
        assert "await AsyncFiretitanServiceClient.create_training_client" in str(warning.message)
        assert warning.filename == __file__  # points at the caller's line, not the facade
        return tc

    tc = asyncio.run(main())
    assert tc.forward([datum()], "cross_entropy").result() is not None


def test_the_warning_is_once_per_call_site_under_default_filters(
    training: FiretitanTrainingClient,
) -> None:
    async def main() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("default")  # Python's default: once per location
            for _ in range(3):
                training.list_checkpoints()  # one call site, three calls
            training.list_checkpoints()  # a second call site
        return record

    record = asyncio.run(main())
    assert len(record) == 2
    assert all(issubclass(w.category, RuntimeWarning) for w in record)


def test_waiting_on_a_future_inside_a_running_loop_warns(
    training: FiretitanTrainingClient,
) -> None:
    async def main() -> None:
        fut = training.forward([datum()], "cross_entropy")
        with pytest.warns(RuntimeWarning, match="await fut"):
            fut.result()
        fut.result()  # finished futures never block, so never warn

    asyncio.run(main())


def test_no_warning_under_an_ipython_kernel(
    training: FiretitanTrainingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    class ZMQInteractiveShell:  # what Jupyter's kernel runs (the name is what counts)
        pass

    shell = ZMQInteractiveShell()
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)

    async def cell() -> list[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            names = training.list_checkpoints()  # a notebook cell blocking is expected
            training.forward([datum()], "cross_entropy").result()
        return names

    assert asyncio.run(cell()) == []


def test_futures_can_be_awaited_from_any_loop(training: FiretitanTrainingClient) -> None:
    async def await_directly() -> Any:
        return await training.forward([datum()], "cross_entropy")

    async def await_result_async() -> Any:
        fut = training.forward_backward([datum()], "cross_entropy")
        return await fut.result_async(timeout=30)

    async def gather_many() -> list[Any]:
        futs = [training.forward([datum(offset=i)], "cross_entropy") for i in range(1, 6)]
        return list(await asyncio.gather(*futs))

    # Several short-lived loops in a row, as scripts and notebooks create them.
    for _ in range(2):
        assert asyncio.run(await_directly()).loss_fn_outputs
        assert asyncio.run(await_result_async()).metrics
        assert len(asyncio.run(gather_many())) == 5
    # The firetitan loop itself never stopped.
    assert training.forward([datum()], "cross_entropy").result() is not None


def test_result_async_timeout_cancels(toy_service: Any) -> None:
    tc = toy_service.create_training_client("p2-timeout")
    slow = tc.step("slow", delay=30)

    async def main() -> None:
        with pytest.raises(FutureTimeoutError):
            await slow.result_async(timeout=0.1)

    asyncio.run(main())
    assert slow.cancelled()


def test_cancelling_the_awaiting_task_cancels_the_request(toy_service: Any) -> None:
    tc = toy_service.create_training_client("p2-task-cancel")
    slow = tc.step("slow", delay=30)

    async def main() -> None:
        task = asyncio.ensure_future(slow.coroutine())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert slow.cancelled()


def test_client_created_inside_a_short_lived_loop_outlives_it(trainer: LocalTrainer) -> None:
    async def build() -> FiretitanServiceClient:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # blocking in a loop: expected
            return FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key)

    service = asyncio.run(build())  # that loop is closed now
    try:
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        assert tc.forward([datum()], "cross_entropy").result() is not None
    finally:
        service.close()


def test_aiohttp_objects_are_born_on_the_firetitan_loop(toy_service: Any) -> None:
    session = toy_service._inner._session
    assert session is not None
    assert session._loop is get_portal().loop
