"""Argument errors raise at the call, on the facade exactly as on the async core.

Each case is one bad call; it must raise the same exception type and message through
both surfaces, before anything is sent: the model's calls after it still run, and the
trainer never sees the bad one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import tinker
from shared import connect

from firetitan import ClientClosedError, FiretitanServiceClient
from firetitan.local import LocalTrainer

from .conftest import BASE_MODEL, datum

ADAM = tinker.AdamParams(learning_rate=1e-3)
PROMPT = tinker.ModelInput.from_ints([1, 2, 3])

# (case id, the bad call on a training client, expected exception, message fragment)
TRAINING_CASES: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    ("empty data", lambda tc: tc.forward_backward([], "cross_entropy"), ValueError, "empty"),
    ("one datum", lambda tc: tc.forward(datum(), "cross_entropy"), TypeError, "list"),
    ("no loss", lambda tc: tc.forward_backward([datum()], ""), ValueError, "loss_fn"),
    (
        "config",
        lambda tc: tc.forward_backward([datum()], "ppo", ["clip"]),
        TypeError,
        "loss_fn_config",
    ),
    (
        "normalization",
        lambda tc: tc.optim_step(ADAM, "per_token"),
        ValueError,
        "grad_accumulation_normalization",
    ),
    (
        "adam dict",
        lambda tc: tc.optim_step({"learning_rate": 1e-3}),
        TypeError,
        "tinker.AdamParams",
    ),
    ("deadline", lambda tc: tc.optim_step(ADAM, deadline=-1), ValueError, "deadline"),
    ("state name", lambda tc: tc.save_state("a/b"), ValueError, "a/b"),
    ("ttl", lambda tc: tc.save_state("ok", ttl_seconds=0), ValueError, "ttl_seconds"),
    ("load path", lambda tc: tc.load_state("../x"), ValueError, "../x"),
    (
        "export type",
        lambda tc: tc.save_weights_for_sampler("s", checkpoint_type="full"),
        ValueError,
        "checkpoint_type",
    ),
    (
        "custom loss",
        lambda tc: tc.forward_backward_custom([datum()], "not callable"),
        TypeError,
        "callable",
    ),
]
SAMPLING_CASES: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    ("prompt", lambda sc: sc.sample([1, 2], 1, tinker.SamplingParams()), TypeError, "prompt"),
    ("samples", lambda sc: sc.sample(PROMPT, 0, tinker.SamplingParams()), ValueError, "num_"),
    ("params", lambda sc: sc.sample(PROMPT, 1, {"max_tokens": 2}), TypeError, "SamplingParams"),
    ("logprobs", lambda sc: sc.compute_logprobs("abc"), TypeError, "prompt"),
]


def facade_errors(trainer: LocalTrainer) -> list[tuple[type[Exception], str]]:
    seen: list[tuple[type[Exception], str]] = []
    with FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key) as service:
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        sc = service.create_sampling_client(base_model=BASE_MODEL)
        for _, call, _, _ in TRAINING_CASES:
            with pytest.raises(Exception) as info:
                call(tc)  # raises here: no future is returned
            seen.append((type(info.value), str(info.value)))
        for _, call, _, _ in SAMPLING_CASES:
            with pytest.raises(Exception) as info:
                call(sc)
            seen.append((type(info.value), str(info.value)))
        # Nothing bad reached the trainer, and the model's queue is not stalled.
        assert tc.forward_backward([datum()], "cross_entropy").result(30).metrics
        assert service.get_server_capabilities() is not None
    return seen


async def async_errors(trainer: LocalTrainer) -> list[tuple[type[Exception], str]]:
    seen: list[tuple[type[Exception], str]] = []
    async with connect(trainer.base_url, trainer.api_key) as service:
        tc = await service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        sc = await service.create_sampling_client(base_model=BASE_MODEL)
        for _, call, _, _ in TRAINING_CASES:
            with pytest.raises(Exception) as info:
                call(tc)
            seen.append((type(info.value), str(info.value)))
        for _, call, _, _ in SAMPLING_CASES:
            with pytest.raises(Exception) as info:
                call(sc)
            seen.append((type(info.value), str(info.value)))
        assert (await tc.forward_backward([datum()], "cross_entropy")).metrics
    return seen


def test_argument_errors_raise_at_the_call_on_both_surfaces(trainer: LocalTrainer) -> None:
    on_facade = facade_errors(trainer)
    on_async = asyncio.run(async_errors(trainer))
    assert on_facade == on_async
    for (name, _, kind, fragment), (got, message) in zip(
        [*TRAINING_CASES, *SAMPLING_CASES], on_facade, strict=True
    ):
        assert got is kind, f"{name}: {got.__name__}: {message}"
        assert fragment in message, f"{name}: {message}"


def test_a_closed_client_refuses_at_the_call_on_both_surfaces(trainer: LocalTrainer) -> None:
    service = FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key)
    tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
    sc = service.create_sampling_client(base_model=BASE_MODEL)
    service.close()
    with pytest.raises(ClientClosedError):
        tc.forward_backward([datum()], "cross_entropy")  # no future: raised here
    with pytest.raises(ClientClosedError):
        tc.optim_step(ADAM)
    with pytest.raises(ClientClosedError):
        sc.sample(PROMPT, 1, tinker.SamplingParams())

    async def on_async() -> None:
        async with connect(trainer.base_url, trainer.api_key) as service:
            tc = await service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
            sc = await service.create_sampling_client(base_model=BASE_MODEL)
        with pytest.raises(ClientClosedError):
            tc.forward_backward([datum()], "cross_entropy")
        with pytest.raises(ClientClosedError):
            tc.optim_step(ADAM)
        with pytest.raises(ClientClosedError):
            sc.sample(PROMPT, 1, tinker.SamplingParams())

    asyncio.run(on_async())
