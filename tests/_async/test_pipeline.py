"""Ordering and pipelining: call order is execution order, nothing waits for an
earlier result, and a cancelled or failed call never stalls the ones after it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from shared import connect, proxied

from firetitan import (
    AsyncAPIFuture,
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    BadRequestError,
    FutureState,
    FutureTimeoutError,
    RequestFailedError,
)
from firetitan.local import LocalTrainer

from .helpers import (
    ADAM,
    BASE_MODEL,
    FAST_TRAINER,
    batch,
    chunked_config,
    executed,
    pipelined_pairs,
    sequential_pairs,
    slow_model,
    summary,
    until,
)

PAIRS = 50


@pytest.mark.asyncio
async def test_fifty_pipelined_pairs_match_the_sequential_run() -> None:
    runs = []
    for flow in (pipelined_pairs, sequential_pairs):
        async with (
            LocalTrainer("null", seed=5, **FAST_TRAINER) as trainer,
            connect(trainer.base_url, trainer.api_key) as service,
        ):
            tc = await service.create_training_client(BASE_MODEL)
            results = await flow(tc, PAIRS)
            log = executed(trainer, tc.model_id)
            runs.append(([summary(r) for r in results], log))
    (pipelined, log_a), (sequential, log_b) = runs
    expected = [
        (seq, "forward_backward" if seq % 2 else "optim_step") for seq in range(1, 2 * PAIRS + 1)
    ]
    assert log_a == expected and log_b == expected
    assert pipelined == sequential
    assert pipelined[-1] == {
        "optim_step:max": float(PAIRS),
        "learning_rate:unique": 1e-3,
        "loss_tokens:sum": 16.0,
        "sequences:sum": 2.0,
    }


@pytest.mark.asyncio
async def test_calls_are_sent_without_waiting_for_results() -> None:
    async with slow_model(pause=0.15) as (_trainer, tc):
        futures: list[AsyncAPIFuture[Any]] = [
            tc.forward_backward(batch(1, seed=i), "cross_entropy") for i in range(20)
        ]
        futures.append(tc.optim_step(ADAM))
        # Every request is acknowledged while the trainer is still on the early ones.
        await until(
            lambda: all(f.state not in (FutureState.QUEUED, FutureState.SENDING) for f in futures)
        )
        assert all(f.request_id for f in futures)
        assert not futures[-2].done()  # the last batch is still waiting to run
        await asyncio.gather(*futures)


@pytest.mark.asyncio
async def test_a_call_cancelled_before_sending_takes_no_seq_id(
    trainer: LocalTrainer, tc: AsyncFiretitanTrainingClient
) -> None:
    futures = [tc.forward_backward(batch(1, seed=i), "cross_entropy") for i in range(10)]
    victim = tc.optim_step(ADAM)
    after = [tc.forward(batch(1, seed=i), "cross_entropy") for i in range(5)]
    assert victim.state is FutureState.QUEUED
    assert victim.cancel()
    assert victim.cancelled() and str(victim.state) == "cancelled"
    assert not victim.cancel()
    # The calls after it complete; the trainer saw no gap (a gap would wait 20 s).
    await asyncio.wait_for(asyncio.gather(*futures, *after), timeout=15)
    log = executed(trainer, tc.model_id)
    assert [s for s, _ in log] == list(range(1, 16))
    assert "optim_step" not in {k for _, k in log}
    with pytest.raises(asyncio.CancelledError):
        await victim


@pytest.mark.asyncio
async def test_a_sent_call_cancelled_still_runs_and_later_calls_proceed() -> None:
    async with slow_model(pause=0.3) as (trainer, tc):
        first = tc.forward_backward(batch(2), "cross_entropy")
        await until(lambda: first.state is not FutureState.QUEUED and first.request_id is not None)
        assert first.state is FutureState.SENT  # the trainer is still on it
        assert first.cancel()
        step = await tc.optim_step(ADAM)
        assert step.metrics and step.metrics["loss_tokens:sum"] == 16.0  # the batch was applied
        kinds = [k for _, k in executed(trainer, tc.model_id)]
        assert kinds == ["forward_backward", "optim_step"]


@pytest.mark.asyncio
async def test_waiting_with_a_timeout_never_cancels_or_stalls(
    service: AsyncFiretitanServiceClient,
) -> None:
    """The reference client deadlocks here (tinker-sdk.md §6.1): a caller's timeout
    cancels a queued op's turn and every later op waits forever."""
    tc = await service.create_training_client(BASE_MODEL)
    futures = [tc.forward_backward(batch(4, seed=i), "cross_entropy") for i in range(10)]
    step = tc.optim_step(ADAM)
    with pytest.raises(FutureTimeoutError):
        await step.result_async(timeout=1e-6)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(step, timeout=1e-6)
    assert not step.cancelled()
    later = tc.forward(batch(1), "cross_entropy")
    await asyncio.wait_for(asyncio.gather(*futures, step, later), timeout=15)


@pytest.mark.asyncio
async def test_a_failed_call_does_not_stall_later_calls(
    trainer: LocalTrainer, tc: AsyncFiretitanTrainingClient
) -> None:
    bad = tc.forward_backward(batch(1), "no_such_loss")
    good = tc.forward_backward(batch(1), "cross_entropy")
    step = tc.optim_step(ADAM)
    with pytest.raises(RequestFailedError) as info:
        await bad
    assert info.value.category == "user" and info.value.request_id == bad.request_id
    assert bad.state is FutureState.FAILED
    await good
    metrics = (await step).metrics
    assert metrics is not None and metrics["loss_tokens:sum"] == 8.0


@pytest.mark.asyncio
async def test_a_future_past_its_deadline_fails_and_others_proceed(
    tc: AsyncFiretitanTrainingClient,
) -> None:
    before = [tc.forward_backward(batch(2, seed=i), "cross_entropy") for i in range(5)]
    hurried = tc.optim_step(ADAM, deadline=1e-4)
    after = tc.optim_step(ADAM)
    with pytest.raises(FutureTimeoutError, match="deadline"):
        await hurried
    assert hurried.state is FutureState.FAILED
    await asyncio.gather(*before, after)


@pytest.mark.asyncio
async def test_calls_from_many_tasks_keep_call_order(
    trainer: LocalTrainer, tc: AsyncFiretitanTrainingClient
) -> None:
    order: list[str] = []

    async def worker(name: str) -> None:
        for i in range(5):
            order.append(f"{name}{i}")
            kind = "forward" if name == "a" else "forward_backward"
            future = tc.forward(batch(1), "cross_entropy") if kind == "forward" else (
                tc.forward_backward(batch(1), "cross_entropy")
            )
            await asyncio.sleep(0)
            await future

    await asyncio.gather(worker("a"), worker("b"))
    kinds = [k for _, k in executed(trainer, tc.model_id)]
    expected = ["forward" if tag[0] == "a" else "forward_backward" for tag in order]
    assert kinds == expected


@pytest.mark.asyncio
async def test_two_services_on_two_trainers_from_one_loop() -> None:
    async def run(trainer: LocalTrainer) -> list[object]:
        async with connect(trainer.base_url, trainer.api_key) as service:
            tc = await service.create_training_client(BASE_MODEL)
            reference = await service.create_base_training_client(BASE_MODEL)
            results = await pipelined_pairs(tc, 5)
            await reference.forward(batch(2), "cross_entropy")
            await tc.save_state("end")
            return results

    async with (
        LocalTrainer("null", **FAST_TRAINER) as one,
        LocalTrainer("null", **FAST_TRAINER) as two,
    ):
        a, b = await asyncio.gather(run(one), run(two))
        assert [summary(r) for r in a] == [summary(r) for r in b]
        for trainer in (one, two):
            assert [r.kind for r in trainer.execution_log].count("optim_step") == 5


@pytest.mark.asyncio
async def test_a_refused_submission_fails_only_its_call(trainer: LocalTrainer) -> None:
    async with proxied(trainer) as (proxy, service):
        tc = await service.create_training_client(BASE_MODEL)
        proxy.inject("status_400", "/api/v1/forward_backward")
        refused = tc.forward_backward(batch(2), "cross_entropy")
        accepted = tc.forward_backward(batch(1), "cross_entropy")
        step = tc.optim_step(ADAM)
        with pytest.raises(BadRequestError, match="injected: refused"):
            await refused
        await accepted
        metrics = (await step).metrics
        # Without the refused batch:
        assert metrics is not None and metrics["loss_tokens:sum"] == 8.0
        # The refused call's seq_id was reused: no gap for the trainer to wait on.
        assert executed(trainer, tc.model_id) == [(1, "forward_backward"), (2, "optim_step")]


@pytest.mark.asyncio
async def test_a_partly_refused_chunked_call_spends_its_seq_ids(trainer: LocalTrainer) -> None:
    async with proxied(trainer, config=chunked_config(1)) as (proxy, service):
        tc = await service.create_training_client(BASE_MODEL)
        proxy.inject("status_400", "/api/v1/forward_backward")
        partial = tc.forward_backward(batch(3), "cross_entropy")
        step = tc.optim_step(ADAM)
        with pytest.raises(BadRequestError):
            await partial
        # Two of the three chunks ran; the step after them is not stalled by the gap.
        metrics = (await asyncio.wait_for(step.result_async(), timeout=15)).metrics
        assert metrics is not None and metrics["loss_tokens:sum"] == 16.0
        log = executed(trainer, tc.model_id)
        assert [k for _, k in log] == ["forward_backward", "forward_backward", "optim_step"]
        assert log[-1][0] == 4 and len({s for s, _ in log}) == 3
