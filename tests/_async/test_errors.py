"""Error classes, closed clients, wrong loops, and the API key's absence from every
repr, log line, exception and pickle."""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from faults import FaultProxy
from shared import Surface, connect

from firetitan import (
    APIConnectionError,
    APIStatusError,
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    AuthenticationError,
    ClientClosedError,
    ClientUsageError,
    FiretitanError,
    GoneError,
    NotFoundError,
    RequestFailedError,
    RetryPolicy,
)
from firetitan._transport import Transport
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_CLIENT, FAST_TRAINER, batch

SECRET = "tml-do-not-leak-7f3a9c"


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def assert_no_key(key: str, exc: BaseException) -> None:
    """No link of the chain shows the key, and every link pickles without it (an error
    that does not pickle breaks multiprocessing, so it fails this check too)."""
    for link in chain(exc):
        assert key not in str(link) and key not in repr(link)
        assert key not in repr(getattr(link, "args", ()))
        data = pickle.dumps(link)
        assert key.encode() not in data
        assert str(pickle.loads(data)) == str(link)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.asyncio
async def test_wrong_key_is_an_authentication_error(trainer: LocalTrainer) -> None:
    client = connect(trainer.base_url, SECRET)
    with pytest.raises(AuthenticationError) as info:
        await client.__aenter__()
    await client.aclose()
    error = info.value
    assert issubclass(AuthenticationError, APIStatusError) and error.status_code == 401
    assert "401" in str(error) and error.message
    assert_no_key(SECRET, error)
    assert pickle.loads(pickle.dumps(error)).status_code == 401


@pytest.mark.asyncio
async def test_user_errors_are_request_failures_with_category_user(
    surface: Surface, any_model: Any
) -> None:
    bad_token = batch(1)
    bad_token[0].loss_fn_inputs["target_tokens"].to_numpy()[0] = 10**6  # outside the vocab
    with pytest.raises(RequestFailedError) as info:
        await surface.call(any_model.forward, bad_token, "cross_entropy")
    error = info.value
    assert error.category == "user" and error.request_id
    assert "data[0]" in error.message or "datum 0" in error.message
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.category, copy.request_id) == ("user", error.request_id)


@pytest.mark.asyncio
async def test_unknown_and_expired_futures(trainer: LocalTrainer) -> None:
    async with (
        LocalTrainer("null", **{**FAST_TRAINER, "max_retained_results": 1}) as small,
        connect(small.base_url, small.api_key) as service,
    ):
        tc = await service.create_training_client(BASE_MODEL)
        first = tc.forward(batch(1), "cross_entropy")
        await first
        await tc.forward(batch(1), "cross_entropy")
        await tc.forward(batch(1), "cross_entropy")
        assert first.request_id is not None
        with pytest.raises(GoneError):
            await tc._poller.wait(first.request_id, "Forward")
        with pytest.raises(NotFoundError):
            await tc._poller.wait("req-that-never-was", "Forward")


@pytest.mark.asyncio
async def test_unreachable_trainer_is_a_connection_error() -> None:
    config = FAST_CLIENT.evolve(retry=RetryPolicy(max_attempts=3, initial_backoff=0.01))
    client = connect(f"http://127.0.0.1:{free_port()}", SECRET, config)
    with pytest.raises(APIConnectionError) as info:
        await client.__aenter__()
    await client.aclose()
    assert isinstance(info.value, FiretitanError)
    assert info.value.__cause__ is not None  # the aiohttp error, chained
    assert_no_key(SECRET, info.value)


@pytest.mark.asyncio
async def test_closed_clients_refuse_work_and_fail_pending_futures(
    service: AsyncFiretitanServiceClient, tc: AsyncFiretitanTrainingClient
) -> None:
    pending = [tc.forward_backward(batch(2, seed=i), "cross_entropy") for i in range(20)]
    await service.aclose()
    await service.aclose()  # idempotent
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(
        isinstance(r, ClientClosedError) or not isinstance(r, BaseException) for r in results
    )
    assert any(isinstance(r, ClientClosedError) for r in results)
    with pytest.raises(ClientClosedError):
        tc.optim_step(ADAM)
    with pytest.raises(ClientClosedError):
        await service.create_training_client(BASE_MODEL, seed=9)
    with pytest.raises(ClientClosedError):
        await tc.list_checkpoints()
    assert "closed" in repr(service)


def test_a_client_belongs_to_one_event_loop() -> None:
    with LocalTrainer("null", **FAST_TRAINER) as trainer:
        service = connect(trainer.base_url, trainer.api_key)
        home = asyncio.new_event_loop()
        try:
            tc = home.run_until_complete(service.create_training_client(BASE_MODEL))

            async def elsewhere() -> None:
                with pytest.raises(ClientUsageError, match="another event loop"):
                    tc.forward(batch(1), "cross_entropy")

            asyncio.run(elsewhere())
            with pytest.raises(ClientUsageError, match="running event loop"):
                tc.forward(batch(1), "cross_entropy")
        finally:
            home.run_until_complete(service.aclose())
            home.close()


@pytest.mark.asyncio
async def test_the_key_never_shows_in_reprs_logs_errors_or_pickles(
    trainer: LocalTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    key = trainer.api_key
    caplog.set_level(logging.DEBUG)
    async with FaultProxy(trainer.base_url) as proxy:
        proxy.inject("status_503", "/api/v1/forward_backward")
        proxy.inject("cut_after", "/api/v1/optim_step")
        async with connect(proxy.base_url, key) as service:
            tc = await service.create_training_client(BASE_MODEL)
            fb = tc.forward_backward(batch(2), "cross_entropy")
            step = tc.optim_step(ADAM)
            await fb
            await step
            failed = tc.forward(batch(1), "no_such_loss")
            with pytest.raises(RequestFailedError) as info:
                await failed
            assert_no_key(key, info.value)
            transport = service._transport
            for thing in (service, tc, fb, transport, transport._key):
                assert key not in repr(thing) and key not in str(thing)
            for thing in (service, tc, transport, transport._key):
                with pytest.raises(TypeError) as refused:
                    pickle.dumps(thing)
                assert key not in str(refused.value)
            assert key not in str(vars(service)) and key not in str(vars(tc))
    assert caplog.text and "retrying" in caplog.text
    assert key not in caplog.text
    assert all(key not in str(r.args) for r in caplog.records)


def test_transport_refuses_a_bad_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIRETITAN_BASE_URL", raising=False)
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="http"):
        Transport("ftp://example", SECRET, FAST_CLIENT)
    with pytest.raises(ValueError, match="base_url"):
        AsyncFiretitanServiceClient(base_url="", api_key=SECRET)
