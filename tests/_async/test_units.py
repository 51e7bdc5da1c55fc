"""The sans-network parts: configuration, backoff, Retry-After, futures; and two
transport behaviours seen through the proxy (Retry-After, bounded polling)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from typing import Any

import pytest
from faults import FaultPlan, FaultProxy
from shared import connect, proxied

from firetitan import (
    AsyncAPIFuture,
    ClientConfig,
    FutureState,
    FutureTimeoutError,
    Limits,
    RetryPolicy,
    Timeouts,
)
from firetitan._async.polling import Poller
from firetitan._transport import _detail, _retry_after
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_CLIENT, FAST_TRAINER, SlowEngine, batch


def test_config_is_validated_and_evolves() -> None:
    config = ClientConfig()
    assert config.retry.max_attempts == 10 and config.timeouts.long_poll_read == 45.0
    changed = config.evolve(future_deadline=None)
    assert changed.future_deadline is None and config.future_deadline == 7200.0
    with pytest.raises(ValueError, match="connect"):
        Timeouts(connect=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ValueError):
        Limits(max_polls_per_model=0)
    with pytest.raises(ValueError, match="future_deadline"):
        config.evolve(future_deadline=-1)
    with pytest.raises(TypeError):
        config.evolve(no_such_field=1)


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=4.0, jitter=0.25)
    assert [policy.backoff(n, 0.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.backoff(3, 0.999) == pytest.approx(2.0 * (1 - 0.25 * 0.999))


def test_retry_after_forms() -> None:
    assert _retry_after({"Retry-After": "3"}) == 3.0
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    assert _retry_after({"Retry-After": "soon"}) is None
    assert _retry_after({"Retry-After": "-1"}) is None
    assert _retry_after({}) is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    value = _retry_after({"Retry-After": when})
    assert value is not None and 25 <= value <= 31


def test_error_detail_shapes() -> None:
    assert _detail({"detail": "bad shape"}) == "bad shape"
    assert _detail({"message": "m"}) == "m"
    assert _detail({"error": {"message": "nested"}}) == "nested"
    assert _detail({"error": "flat"}) == "flat"
    assert _detail({"detail": [{"loc": ["x"]}]}) == "[{'loc': ['x']}]"
    assert _detail("text") is None


@pytest.mark.asyncio
async def test_future_basics() -> None:
    future: AsyncAPIFuture[int] = AsyncAPIFuture(kind="demo", deadline=None)
    seen: list[FutureState] = []
    future.add_done_callback(lambda f: seen.append(f.state))
    assert future.state is FutureState.QUEUED and not future.done()
    with pytest.raises(FutureTimeoutError, match="not cancelled"):
        await future.result_async(timeout=0.001)
    assert not future.done()
    future._add_request_id("req-1")
    future._set_result(7)
    assert await future == 7 and await future.result_async(timeout=1) == 7
    assert future.exception() is None and future.request_ids == ("req-1",)
    await asyncio.sleep(0)
    assert seen == [FutureState.DONE]
    assert "demo done" in repr(future)

    expiring: AsyncAPIFuture[int] = AsyncAPIFuture(kind="demo", deadline=0.001)
    with pytest.raises(FutureTimeoutError, match="deadline"):
        await expiring
    assert isinstance(expiring.exception(), TimeoutError)
    assert expiring.deadline is not None

    waiter: AsyncAPIFuture[int] = AsyncAPIFuture(kind="demo", deadline=None)
    task = asyncio.ensure_future(waiter.result_async())
    await asyncio.sleep(0)
    task.cancel()  # cancelling the waiter does not cancel the future
    await asyncio.gather(task, return_exceptions=True)
    assert not waiter.done()
    assert waiter.cancel() and waiter.state is FutureState.CANCELLED


@pytest.mark.asyncio
async def test_retry_after_is_honoured(
    trainer: LocalTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firetitan")
    config = FAST_CLIENT.evolve(retry=RetryPolicy(initial_backoff=0.001, max_retry_after=5))
    async with FaultProxy(trainer.base_url, FaultPlan(retry_after=0.3)) as proxy:
        proxy.inject("status_429", "/api/v1/create_session")
        async with connect(proxy.base_url, trainer.api_key, config) as service:
            assert service.session_id  # opened after one 429
    attempts = proxy.requests_to("/api/v1/create_session")
    assert [r.fault for r in attempts] == ["status_429", None]
    # The retry waited the trainer's Retry-After, not the 1 ms backoff.
    assert "POST /api/v1/create_session (attempt 2) in 0.30 s" in caplog.text
    keys = {r.headers["X-Idempotency-Key"] for r in attempts}
    assert len(keys) == 1  # one call, one key across its retries


@pytest.mark.asyncio
async def test_polls_per_model_are_bounded() -> None:
    config = FAST_CLIENT.evolve(limits=Limits(max_polls_per_model=2))
    async with (
        LocalTrainer(SlowEngine(pause=0.02), **FAST_TRAINER) as trainer,
        proxied(trainer, config=config) as (proxy, service),
    ):
        tc = await service.create_training_client(BASE_MODEL)
        futures: list[AsyncAPIFuture[Any]] = [
            tc.forward_backward(batch(1, seed=i), "cross_entropy") for i in range(40)
        ]
        futures.append(tc.optim_step(ADAM))
        await asyncio.gather(*futures)
        assert proxy.max_in_flight["/api/v1/retrieve_future"] <= 2
        assert len(proxy.requests_to("/api/v1/forward_backward")) == 40


@pytest.mark.asyncio
async def test_complete_metadata_makes_the_next_poll_ask_for_the_full_body(
    trainer: LocalTrainer,
) -> None:
    async with proxied(trainer) as (proxy, service):
        tc = await service.create_training_client(BASE_MODEL)
        proxy.inject("complete_metadata", "/api/v1/retrieve_future")
        future = tc.forward(batch(1), "cross_entropy")
        out = await future
        assert len(out.loss_fn_outputs) == 1
        polls = [
            r for r in proxy.requests_to("/api/v1/retrieve_future")
            if r.body["request_id"] == future.request_id
        ]
        assert polls[0].fault == "complete_metadata"
        assert polls[0].body["allow_metadata_only"] is True
        assert all(p.body["allow_metadata_only"] is False for p in polls[1:])


class _ScriptedTransport:
    """Answers retrieve_future polls from a script (the queue states a trainer reports)."""

    def __init__(self, config: ClientConfig, answers: list[dict[str, Any]]) -> None:
        self.config = config
        self._answers = answers

    async def post(self, path: str, body: Any, **_: Any) -> Any:
        return self._answers.pop(0)


@pytest.mark.asyncio
async def test_queue_state_changes_reach_the_callback_and_the_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, str | None]] = []
    config = ClientConfig(on_queue_state=lambda state, reason: seen.append((state, reason)))
    paused = {
        "type": "try_again",
        "request_id": "r",
        "queue_state": "paused_rate_limit",
        "queue_state_reason": "3 training clients at once is the limit",
    }
    script = [paused, paused, {"type": "try_again", "request_id": "r"}, {"ok": 1}]
    poller = Poller(_ScriptedTransport(config, script), 1)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="firetitan"):
        assert await poller.wait("r", "Sample") == {"ok": 1}
    assert seen == [
        ("paused_rate_limit", "3 training clients at once is the limit"),
        ("active", None),
    ]
    lines = [r.getMessage() for r in caplog.records if "queue" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0] == (
        "trainer queue is paused_rate_limit (3 training clients at once is the limit); "
        "request r waits"
    )
