"""The async core against the torch engine: pipelining and the custom-loss path leave
the model exactly where the plain, awaited calls leave it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tinker
import torch
from shared import connect

from firetitan import AsyncFiretitanTrainingClient
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_TRAINER, batch

pytest.importorskip("firetitan.local.torch", reason="needs the local extra (torch engine)")

pytestmark = pytest.mark.slow

PROBE = batch(2, seed=77)


async def probe(tc: AsyncFiretitanTrainingClient) -> list[np.ndarray]:
    out = await tc.forward(PROBE, "cross_entropy")
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


@pytest.mark.asyncio
async def test_pipelined_and_awaited_runs_end_with_identical_weights() -> None:
    async with (
        LocalTrainer("torch", **FAST_TRAINER) as trainer,
        connect(trainer.base_url, trainer.api_key) as service,
    ):
        pipelined = await service.create_training_client(BASE_MODEL, seed=1)
        awaited = await service.create_training_client(BASE_MODEL, seed=2)
        assert all(np.array_equal(a, b) for a, b in zip(
            await probe(pipelined), await probe(awaited), strict=True
        ))
        futures: list[Any] = []
        for i in range(3):
            futures.append(pipelined.forward_backward(batch(2, seed=i), "cross_entropy"))
            futures.append(pipelined.optim_step(ADAM))
        for future in futures:
            await future
        for i in range(3):
            await awaited.forward_backward(batch(2, seed=i), "cross_entropy")
            await awaited.optim_step(ADAM)
        for a, b in zip(await probe(pipelined), await probe(awaited), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.asyncio
async def test_custom_cross_entropy_trains_like_the_builtin_loss() -> None:
    def cross_entropy(data: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
        loss = sum(
            -(lp * torch.from_numpy(d.loss_fn_inputs["weights"].to_numpy())).sum()
            for d, lp in zip(data, logprobs, strict=True)
        )
        return loss, {}

    async with (
        LocalTrainer("torch", **FAST_TRAINER) as trainer,
        connect(trainer.base_url, trainer.api_key) as service,
    ):
        custom = await service.create_training_client(BASE_MODEL, seed=1)
        builtin = await service.create_training_client(BASE_MODEL, seed=2)
        data = batch(2, seed=5)
        custom_out = custom.forward_backward_custom(data, cross_entropy)
        custom_step = custom.optim_step(ADAM)  # ordered after the custom backward
        builtin_out = await builtin.forward_backward(data, "cross_entropy")
        await builtin.optim_step(ADAM)
        assert (await custom_out).metrics["loss"] == pytest.approx(
            builtin_out.metrics["loss:sum"], rel=1e-5
        )
        await custom_step
        for a, b in zip(await probe(custom), await probe(builtin), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
