"""`@rpc` methods: one signature and docstring, the call's checks on any thread, the
start on the loop (`firetitan/_async/_rpc.py`)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import tinker

from firetitan import AsyncAPIFuture, AsyncFiretitanTrainingClient
from firetitan._async._rpc import Start, rpc

from .helpers import datum


def test_callers_see_the_future_in_the_signature() -> None:
    forward = AsyncFiretitanTrainingClient.forward
    sig = inspect.signature(forward)
    assert list(sig.parameters) == ["self", "data", "loss_fn", "loss_fn_config", "deadline"]
    assert sig.return_annotation == "AsyncAPIFuture[tinker.ForwardBackwardOutput]"
    assert forward.__name__ == "forward"
    assert forward.__qualname__ == "AsyncFiretitanTrainingClient.forward"
    assert (inspect.getdoc(forward) or "").startswith("Run a forward pass")
    backward = AsyncFiretitanTrainingClient.forward_backward
    assert inspect.signature(backward) == sig
    assert (inspect.getdoc(backward) or "").startswith("Run a forward and backward pass")
    step = inspect.signature(AsyncFiretitanTrainingClient.optim_step)
    assert step.return_annotation == "AsyncAPIFuture[tinker.OptimStepResponse]"


@pytest.mark.asyncio
async def test_bound_methods_call_prepare_and_start(tc: AsyncFiretitanTrainingClient) -> None:
    assert next(iter(inspect.signature(tc.forward).parameters)) == "data"
    assert "forward" in repr(tc.forward)
    # Through the instance, and through the class like a function.
    first = tc.forward([datum()], "cross_entropy")
    second = AsyncFiretitanTrainingClient.forward(tc, [datum()], "cross_entropy")
    assert isinstance(first, AsyncAPIFuture) and isinstance(second, AsyncAPIFuture)
    assert len((await first).loss_fn_outputs) == len((await second).loss_fn_outputs) == 1


@pytest.mark.asyncio
async def test_prepare_checks_on_another_thread_and_starts_on_the_loop(
    tc: AsyncFiretitanTrainingClient,
) -> None:
    # A thread without an event loop, like a facade caller's.
    with pytest.raises(ValueError, match="empty"):
        await asyncio.to_thread(tc.forward_backward.prepare, [], "cross_entropy")
    with pytest.raises(TypeError, match=r"tinker\.AdamParams"):
        await asyncio.to_thread(tc.optim_step.prepare, {"learning_rate": 1.0})
    start = await asyncio.to_thread(tc.optim_step.prepare, tinker.AdamParams(learning_rate=1e-3))
    assert not tc._live  # nothing submitted until the start runs
    result = await start()
    assert isinstance(result, tinker.OptimStepResponse)


def test_an_rpc_method_must_return_a_start() -> None:
    def plain(self: object) -> int:
        return 1

    with pytest.raises(TypeError, match=r"-> Start\[T\]"):
        rpc(plain)  # type: ignore[arg-type]

    def fine(self: object) -> Start[int]:
        raise NotImplementedError

    assert inspect.signature(rpc(fine)).return_annotation == "AsyncAPIFuture[int]"
