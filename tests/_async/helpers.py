"""Shared builders and small flows for the async-core tests.

The flows are plain functions of a client, so that the same steps can be driven
through the sync facade too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import tinker
from shared import BASE_MODEL, FAST_CLIENT, FAST_TRAINER, connect

from firetitan import (
    AsyncAPIFuture,
    AsyncFiretitanTrainingClient,
    ClientConfig,
    Limits,
)
from firetitan.local import LocalTrainer
from firetitan.local.null_engine import NullEngine

__all__ = ["BASE_MODEL", "FAST_CLIENT", "FAST_TRAINER"]  # re-exported for the tests here

ADAM = tinker.AdamParams(learning_rate=1e-3)


def datum(length: int = 8, seed: int = 0, *, weights: bool = True) -> tinker.Datum:
    """A text datum with targets in the null engine's vocabulary."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 250, length + 1)  # inside every engine's vocabulary
    inputs: dict[str, Any] = {"target_tokens": tokens[1:].astype(np.int64)}
    if weights:
        inputs["weights"] = np.ones(length, dtype=np.float32)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs
    )


def batch(size: int, seed: int = 0, length: int = 8) -> list[tinker.Datum]:
    return [datum(length, seed * 1000 + i) for i in range(size)]


_UNORDERED = frozenset({"create_model", "unload_model"})


def executed(trainer: LocalTrainer, model_id: str) -> list[tuple[int | None, str]]:
    """``(seq_id, kind)`` of the ordered requests the trainer ran for one model, in
    execution order."""
    return [
        (r.seq_id, r.kind)
        for r in trainer.execution_log
        if r.model_id == model_id and r.kind not in _UNORDERED
    ]


def chunked_config(max_chunk_datums: int) -> ClientConfig:
    return FAST_CLIENT.evolve(limits=Limits(max_chunk_datums=max_chunk_datums))


async def pipelined_pairs(tc: AsyncFiretitanTrainingClient, n: int) -> list[Any]:
    """``n`` forward_backward + optim_step pairs, all submitted before any is awaited."""
    futures: list[AsyncAPIFuture[Any]] = []
    for i in range(n):
        futures.append(tc.forward_backward(batch(2, seed=i), "cross_entropy"))
        futures.append(tc.optim_step(ADAM))
    return [await f for f in futures]


async def sequential_pairs(tc: AsyncFiretitanTrainingClient, n: int) -> list[Any]:
    """The same calls as `pipelined_pairs`, each awaited before the next is made."""
    results: list[Any] = []
    for i in range(n):
        results.append(await tc.forward_backward(batch(2, seed=i), "cross_entropy"))
        results.append(await tc.optim_step(ADAM))
    return results


def summary(result: Any) -> Any:
    """A comparable digest of a forward_backward or optim_step result."""
    if isinstance(result, tinker.ForwardBackwardOutput):
        return (
            result.metrics,
            [out["logprobs"].to_numpy().tolist() for out in result.loss_fn_outputs],
        )
    return result.metrics


class SlowEngine(NullEngine):
    """The null engine with a pause in every training pass, so that a test can see
    requests in flight."""

    def __init__(self, pause: float = 0.05, **options: Any) -> None:
        super().__init__(**options)
        self.pause = pause

    def forward_backward(self, *args: Any, **kwargs: Any) -> tinker.ForwardBackwardOutput:
        time.sleep(self.pause)
        return super().forward_backward(*args, **kwargs)


@contextlib.asynccontextmanager
async def slow_model(
    pause: float,
) -> AsyncIterator[tuple[LocalTrainer, AsyncFiretitanTrainingClient]]:
    """A trainer on a `SlowEngine` pausing ``pause`` s a pass, and a model on it."""
    async with (
        LocalTrainer(SlowEngine(pause=pause), **FAST_TRAINER) as trainer,
        connect(trainer.base_url, trainer.api_key) as service,
    ):
        yield trainer, await service.create_training_client(BASE_MODEL)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds (it reads client state, which has no event)."""
    async with asyncio.timeout(10.0):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
