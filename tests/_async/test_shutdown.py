"""A graceful stop: running work finishes and is delivered, every queued future fails
with "the trainer is shutting down", and later calls are refused."""

from __future__ import annotations

import asyncio

import pytest
from shared import connect

from firetitan import FutureState, RequestFailedError
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_TRAINER, SlowEngine, batch, until


@pytest.mark.asyncio
async def test_a_graceful_stop_fails_every_queued_future_as_shutting_down() -> None:
    trainer = LocalTrainer(SlowEngine(pause=0.5), **FAST_TRAINER)
    await trainer.__aenter__()
    try:
        async with connect(trainer.base_url, trainer.api_key) as service:
            tc = await service.create_training_client(BASE_MODEL)
            running = tc.forward_backward(batch(1), "cross_entropy")
            # More than the client polls at once (Limits.max_polls_per_model), so that
            # most of them are collected by polls sent after the stop began.
            queued = []
            for i in range(6):
                queued.append(tc.forward_backward(batch(1, seed=i + 1), "cross_entropy"))
                queued.append(tc.optim_step(ADAM))
            await until(lambda: all(f.state is FutureState.SENT for f in [running, *queued]))
            stopping = asyncio.create_task(trainer.__aexit__(None, None, None))
            async with asyncio.timeout(60):
                outcomes = await asyncio.gather(*queued, return_exceptions=True)
                assert (await running).metrics  # it was running: it finished and came back
                await stopping
    finally:
        await trainer.__aexit__(None, None, None)
    assert len(outcomes) == 12
    for outcome in outcomes:
        assert isinstance(outcome, RequestFailedError), outcome
        assert outcome.category == "server"
        assert "the trainer is shutting down" in outcome.message
