"""Cancelling a queued request drops it on the trainer: ``cancel_future`` (tinker's
endpoint, which firetitan's sampling client calls for an abandoned sample)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import tinker
from shared import connect

from firetitan.local import LocalTrainer

from .conftest import ModelFactory, TrainerFactory
from .helpers import BASE_MODEL, executed, forward_body

pytestmark = pytest.mark.asyncio

PROMPT = {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]}


@contextlib.asynccontextmanager
async def engine_held(trainer: LocalTrainer) -> AsyncIterator[None]:
    """Keep the engine thread busy, so that what is submitted meanwhile stays queued."""
    release = threading.Event()
    busy = trainer.server._executor.in_engine(lambda: release.wait(60))
    try:
        yield
    finally:
        release.set()
        await busy


def counting_samples(trainer: LocalTrainer, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    sample: Callable[..., Any] = trainer.engine.sample

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return sample(*args, **kwargs)

    monkeypatch.setattr(trainer.engine, "sample", counted)
    return calls


async def test_a_queued_sample_is_dropped(
    make_trainer: TrainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_trainer() as (trainer, api):
        calls = counting_samples(trainer, monkeypatch)
        body = {
            "base_model": BASE_MODEL,
            "num_samples": 4,
            "prompt": PROMPT,
            "sampling_params": {"max_tokens": 4},
        }
        async with engine_held(trainer):
            request_id = await api.submit("asample", body)
            answer = await api.post("cancel_future", {"request_id": request_id})
            assert answer == (200, {"type": "cancel_future", "cancelled": True})
        outcome = await api.outcome(request_id)
        assert outcome["error"] == "asample was cancelled by the client"
        assert outcome["category"] == "user"
        assert calls == []  # the engine never ran it
        # A finished request is not cancelled; unknown ones are 404.
        done = await api.submit("asample", body)
        await api.result(done)
        assert (await api.post("cancel_future", {"request_id": done}))[1]["cancelled"] is False
        assert (await api.post("cancel_future", {"request_id": "req-nope-1"}))[0] == 404


async def test_a_queued_ordered_request_is_dropped_and_its_seq_id_skipped(
    make_model: ModelFactory,
) -> None:
    async with make_model() as (trainer, api, model):
        async with engine_held(trainer):
            running = await api.submit("forward", forward_body(model, 1))
            queued = await api.submit("forward", forward_body(model, 2))
            later = await api.submit("forward", forward_body(model, 3))
            assert (await api.post("cancel_future", {"request_id": queued}))[1]["cancelled"]
            # seq 1 is already with the engine: too late to cancel.
            assert not (await api.post("cancel_future", {"request_id": running}))[1]["cancelled"]
        await api.result(running)
        await api.result(later)
        assert (await api.outcome(queued))["error"] == "forward was cancelled by the client"
        assert executed(trainer, model)[1:] == [(1, "forward"), (3, "forward")]


async def test_cancelling_a_sample_future_cancels_it_on_the_trainer(
    make_trainer: TrainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        make_trainer() as (trainer, api),
        connect(trainer.base_url, trainer.api_key) as svc,
    ):
        calls = counting_samples(trainer, monkeypatch)
        sampler = await svc.create_sampling_client(base_model=BASE_MODEL)
        prompt = tinker.ModelInput.from_ints([1, 2, 3])
        async with engine_held(trainer):
            future = sampler.sample(prompt, 8, tinker.SamplingParams(max_tokens=4))
            for _ in range(600):
                if future.request_id is not None:
                    break
                await asyncio.sleep(0.05)
            request_id = future.request_id
            assert request_id is not None
            assert future.cancel()
            for _ in range(600):  # the client tells the trainer in the background
                outcome = await api.poll(request_id)
                if outcome.get("type") != "try_again":
                    break
                await asyncio.sleep(0.05)
        assert outcome["error"] == "asample was cancelled by the client"
        assert calls == []
