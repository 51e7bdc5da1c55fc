"""forward_backward_custom: the forward, the user's loss, the linearised backward, and
their place in the call order."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from shared import Surface, proxied

from firetitan import AsyncFiretitanServiceClient, AsyncFiretitanTrainingClient, FutureState
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, batch, datum, executed


def doubled_sum(data: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
    """C = 2 * sum(logprobs): its gradient is 2 everywhere."""
    loss = 2 * sum(lp.sum() for lp in logprobs)
    return loss, {"datums": float(len(data))}


@pytest.mark.asyncio
async def test_custom_loss_runs_forward_then_linearised_backward(trainer: LocalTrainer) -> None:
    async with proxied(trainer) as (proxy, service):
        tc = await service.create_training_client(BASE_MODEL)
        data = [datum(6, 1, weights=False), datum(6, 2)]
        custom = tc.forward_backward_custom(data, doubled_sum)
        step = tc.optim_step(ADAM)  # called at once: must run after the backward
        out = await custom
        await step
        assert [k for _, k in executed(trainer, tc.model_id)] == [
            "forward", "forward_backward", "optim_step"
        ]
        forward_body = proxy.requests_to("/api/v1/forward")[0].body
        backward_body = proxy.requests_to("/api/v1/forward_backward")[0].body
        sent = forward_body["forward_input"]["data"]
        assert [set(d["loss_fn_inputs"]) for d in sent] == [{"target_tokens", "weights"}] * 2
        assert sent[0]["loss_fn_inputs"]["weights"]["data"] == [0.0] * 6  # zeros if absent
        for d in backward_body["forward_backward_input"]["data"]:
            assert d["loss_fn_inputs"]["weights"]["data"] == [-2.0] * 6
        assert out.metrics["datums"] == 2.0
        # With weights -2, the trainer's surrogate -sum(w * lp) equals C = 2 * sum(lp).
        assert out.metrics["loss:sum"] == pytest.approx(out.metrics["loss"], rel=1e-5)
        assert out.metrics["response_tokens"] == 12.0
        assert len(out.loss_fn_outputs) == 2


# The tests taking `surface` run through the async core and through the facade.


@pytest.mark.asyncio
async def test_user_metrics_may_name_the_loss(surface: Surface, any_model: Any) -> None:
    def named(data: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
        return sum(lp.sum() for lp in logprobs), {"loss": 42.0}

    out = await surface.call(any_model.forward_backward_custom, batch(2), named)
    assert out.metrics["loss"] == 42.0


@pytest.mark.asyncio
async def test_a_failing_loss_fails_its_future_and_later_calls_proceed(
    trainer: LocalTrainer, tc: AsyncFiretitanTrainingClient
) -> None:
    class Boom(Exception):
        pass

    def failing(data: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
        raise Boom("user code failed")

    custom = tc.forward_backward_custom(batch(2), failing)
    step = tc.optim_step(ADAM)
    with pytest.raises(Boom, match="user code failed"):
        await custom
    assert custom.state is FutureState.FAILED
    await asyncio.wait_for(step, timeout=10)
    assert executed(trainer, tc.model_id) == [(1, "forward"), (2, "optim_step")]


@pytest.mark.asyncio
async def test_a_logprob_tensor_without_gradient_is_a_value_error(
    surface: Surface, any_model: Any
) -> None:
    def first_only(data: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
        return logprobs[0].sum(), {}

    with pytest.raises(ValueError, match=r"data\[1\]"):
        await surface.call(any_model.forward_backward_custom, batch(2), first_only)

    def constant(data: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
        return torch.tensor(1.0), {}

    with pytest.raises(ValueError, match="does not depend"):
        await surface.call(any_model.forward_backward_custom, batch(1), constant)
    await surface.call(any_model.optim_step, ADAM)


@pytest.mark.asyncio
async def test_precomputed_forward_sends_only_the_backward(
    trainer: LocalTrainer, tc: AsyncFiretitanTrainingClient
) -> None:
    data = batch(3)
    forward = await tc.forward(data, "cross_entropy")
    out = await tc.forward_backward_custom(data, doubled_sum, precomputed_forward=forward)
    assert out.metrics["datums"] == 3.0
    assert [k for _, k in executed(trainer, tc.model_id)] == ["forward", "forward_backward"]
    with pytest.raises(ValueError, match="2 datums"):
        tc.forward_backward_custom(data[:2], doubled_sum, precomputed_forward=forward)
    with pytest.raises(ValueError, match="target_tokens"):
        tc.forward_backward_custom(
            [tinker.Datum(model_input=tinker.ModelInput.from_ints([1, 2]))], doubled_sum
        )


@pytest.mark.asyncio
async def test_cancelling_a_custom_call_drops_its_backward(
    trainer: LocalTrainer, tc: AsyncFiretitanTrainingClient
) -> None:
    custom = tc.forward_backward_custom(batch(2), doubled_sum)
    later = tc.optim_step(ADAM)
    assert custom.cancel()
    await asyncio.wait_for(later, timeout=10)
    kinds = [k for _, k in executed(trainer, tc.model_id)]
    assert "forward_backward" not in kinds and kinds[-1] == "optim_step"


@pytest.mark.asyncio
async def test_custom_gradient_matches_the_builtin_cross_entropy(
    service: AsyncFiretitanServiceClient,
) -> None:
    """C = -sum(w * lp) through the custom path sends exactly the data's weights."""
    tc = await service.create_training_client(BASE_MODEL)
    data = batch(2)

    def cross_entropy(items: list[tinker.Datum], logprobs: list[torch.Tensor]) -> tuple[Any, Any]:
        loss = sum(
            -(lp * torch.from_numpy(d.loss_fn_inputs["weights"].to_numpy())).sum()
            for d, lp in zip(items, logprobs, strict=True)
        )
        return loss, {}

    custom = await tc.forward_backward_custom(data, cross_entropy)
    builtin = await tc.forward_backward(data, "cross_entropy")
    assert custom.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(custom.loss_fn_outputs, builtin.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())
