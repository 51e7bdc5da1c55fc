"""A paused trainer: nothing new starts, clients polling the waiting requests hear the
queue state and the trainer's reason (callback and one log line per change), and the
work runs in order once it resumes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
import tinker
from shared import connect

from firetitan import FiretitanServiceClient, FutureState, RequestFailedError
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_CLIENT, batch, executed

REASON = "maintenance: the disk is being replaced"
HELD = {"long_poll_seconds": 0.2}  # polls come back soon with the queue state


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(60.0):
        while not predicate():  # noqa: ASYNC110 - client state has no event to wait on
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_pause_is_heard_with_its_reason_and_the_work_runs_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, str | None]] = []
    config = FAST_CLIENT.evolve(on_queue_state=lambda state, why: seen.append((state, why)))
    async with (
        LocalTrainer("null", **HELD) as trainer,
        connect(trainer.base_url, trainer.api_key, config) as service,
    ):
        tc = await service.create_training_client(BASE_MODEL)
        sampler = await tc.save_weights_and_get_sampling_client()
        trainer.pause(REASON)
        with caplog.at_level(logging.INFO, logger="firetitan"):
            fb = tc.forward_backward(batch(2), "cross_entropy")
            step = tc.optim_step(ADAM)
            sample = sampler.sample(
                tinker.ModelInput.from_ints([1, 2, 3]), 1, tinker.SamplingParams(max_tokens=2)
            )
            await _until(lambda: bool(seen))
            assert seen == [("paused_capacity", REASON)]
            assert not (fb.done() or step.done() or sample.done())
            assert executed(trainer, tc.model_id)[-1][1] == "save_weights_for_sampler"
            trainer.resume()
            await fb, await step, await sample
        assert seen == [("paused_capacity", REASON), ("active", None)]
        assert [kind for _, kind in executed(trainer, tc.model_id)[-2:]] == [
            "forward_backward",
            "optim_step",
        ]
    lines = [r.getMessage() for r in caplog.records if "trainer queue" in r.getMessage()]
    assert len(lines) == 2
    assert f"trainer queue is paused_capacity ({REASON})" in lines[0]
    assert "active again" in lines[1]


def test_pause_from_another_thread_and_cancel_what_waits() -> None:
    """A trainer served on its own thread is paused from the caller's; a held request
    can be cancelled, and the ones after it run once the trainer resumes."""
    with (
        LocalTrainer("null", **HELD) as trainer,
        FiretitanServiceClient(
            base_url=trainer.base_url, api_key=trainer.api_key, config=FAST_CLIENT
        ) as service,
    ):
        tc = service.create_training_client(BASE_MODEL)
        sampler = tc.save_weights_and_get_sampling_client()
        trainer.pause(REASON)
        sample = sampler.sample(
            tinker.ModelInput.from_ints([1, 2, 3]), 1, tinker.SamplingParams(max_tokens=2)
        )
        fb = tc.forward_backward(batch(1), "cross_entropy")
        assert sample.cancel()
        trainer.resume()
        assert fb.result(timeout=60).loss_fn_outputs


@pytest.mark.asyncio
async def test_stopping_a_paused_trainer_fails_what_waits() -> None:
    trainer = LocalTrainer("null", **HELD)
    await trainer.__aenter__()
    try:
        async with connect(trainer.base_url, trainer.api_key) as service:
            tc = await service.create_training_client(BASE_MODEL)
            sampler = await tc.save_weights_and_get_sampling_client()
            trainer.pause(REASON)
            fb = tc.forward_backward(batch(1), "cross_entropy")
            sample = sampler.sample(
                tinker.ModelInput.from_ints([1, 2, 3]), 1, tinker.SamplingParams(max_tokens=2)
            )
            await _until(lambda: fb.state is FutureState.SENT)  # acknowledged, held
            closing = asyncio.create_task(trainer.__aexit__(None, None, None))
            for future in (fb, sample):
                with pytest.raises(RequestFailedError, match="the trainer is shutting down"):
                    await future
            await closing
    finally:
        await trainer.__aexit__(None, None, None)
