"""First contact fails fast and says why; later outages are retried patiently; every
retry is logged (INFO per retry, one WARNING past a threshold), never with the key."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from typing import Any

import pytest
from shared import connect, proxied

from firetitan import APIConnectionError, ClientConfig, RetryPolicy
from firetitan.local import LocalTrainer

from .helpers import FAST_CLIENT, FAST_TRAINER

KEY = "tml-first-contact-secret"
# Generous against a loaded machine, yet far below the patient policy's minute.
SLACK = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def open_client(base_url: str, config: ClientConfig | None = None) -> float:
    """Open a service client that must fail; return how long it took."""
    client = connect(base_url, KEY, config or ClientConfig())
    started = time.monotonic()
    try:
        await client.__aenter__()
    finally:
        elapsed = time.monotonic() - started
        await client.aclose()
    return elapsed


@pytest.mark.asyncio
async def test_a_refused_first_contact_fails_within_the_default_bound_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert RetryPolicy().first_contact_deadline <= 5.0
    caplog.set_level(logging.INFO, logger="firetitan")
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(APIConnectionError) as info:
        await open_client(url)  # the default ClientConfig: patient retries elsewhere
    elapsed = time.monotonic() - started
    assert elapsed < RetryPolicy().first_contact_deadline + SLACK
    message = str(info.value)
    assert f"cannot reach the trainer at {url}" in message
    assert re.search(r": POST /api/v1/\S+ failed: ClientConnectorError", message)  # tried
    assert "attempts in" in message
    assert "check that base_url is right" in message  # what to check
    assert "trainer is running" in message
    assert info.value.__cause__ is not None  # the aiohttp error, chained
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying POST")]
    assert retries and all(r.levelno == logging.INFO for r in retries)
    assert f"(attempt {len(retries) + 1})" not in message  # only retries are logged
    assert KEY not in caplog.text and KEY not in message


@pytest.mark.asyncio
async def test_the_first_contact_bound_is_configurable() -> None:
    config = ClientConfig(retry=RetryPolicy(first_contact_deadline=0.2, initial_backoff=0.05))
    with pytest.raises(APIConnectionError, match="cannot reach the trainer"):
        await open_client(f"http://127.0.0.1:{free_port()}", config)


@pytest.mark.asyncio
async def test_an_unknown_host_fails_fast_naming_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.getaddrinfo

    def resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "trainer.example.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(APIConnectionError) as info:
        await open_client("http://trainer.example.invalid:8000")
    message = str(info.value)
    assert "cannot reach the trainer at http://trainer.example.invalid:8000" in message
    assert "check the host name 'trainer.example.invalid' in base_url" in message


@pytest.mark.asyncio
async def test_a_mid_run_outage_is_retried_patiently(caplog: pytest.LogCaptureFixture) -> None:
    """Once the trainer has answered, a refused connection is retried beyond the first
    contact bound: a trainer that restarts on the same address is waited for."""
    caplog.set_level(logging.INFO, logger="firetitan")
    bound = 0.3
    config = FAST_CLIENT.evolve(retry=RetryPolicy(
        first_contact_deadline=bound, initial_backoff=0.05, max_backoff=0.2, deadline=120.0,
        max_attempts=1000,
    ))
    port = free_port()
    first = LocalTrainer("null", port=port, api_key=KEY, **FAST_TRAINER)
    await first.__aenter__()
    async with connect(first.base_url, KEY, config) as service:
        await service.get_server_capabilities()
        await first.__aexit__(None, None, None)
        call = asyncio.create_task(service.get_server_capabilities())
        # Wait until the call has retried for several times the first-contact bound.
        outage = time.monotonic()
        while time.monotonic() - outage < 3 * bound or len(retries(caplog)) < 3:
            assert not call.done(), call
            await asyncio.sleep(0.05)
        async with LocalTrainer("null", port=port, api_key=KEY, **FAST_TRAINER):
            capabilities = await asyncio.wait_for(call, 60)
    assert capabilities.supported_models
    assert len(retries(caplog)) >= 3
    assert all("ClientConnectorError" in line for line in retries(caplog))


def retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("retrying GET /api/v1/get_server_capabilities")
    ]


@pytest.mark.asyncio
async def test_each_retry_logs_one_info_line_and_a_long_one_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="firetitan")
    config = FAST_CLIENT.evolve(retry=RetryPolicy(
        initial_backoff=0.05, max_backoff=0.05, jitter=0.0, warn_after=0.12, max_retry_after=0.05,
    ))
    async with (
        LocalTrainer("null", api_key=KEY, **FAST_TRAINER) as trainer,
        proxied(trainer, config=config) as (proxy, service),
    ):
        caplog.clear()
        proxy.inject("status_503", "/api/v1/get_server_capabilities", times=5)
        await service.get_server_capabilities()
    lines = [r for r in caplog.records if "get_server_capabilities" in r.getMessage()]
    info = [r.getMessage() for r in lines if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert len(info) == 5  # five refusals, five retries, the sixth attempt succeeds
    for attempt, line in enumerate(info, start=2):
        assert line.startswith(f"retrying GET /api/v1/get_server_capabilities (attempt {attempt})")
    assert all(" in 0.05 s after: HTTP 503 from GET" in line for line in info)
    assert len(warnings) == 1
    assert "GET /api/v1/get_server_capabilities has been retrying for" in warnings[0]
    assert "last failure: HTTP 503" in warnings[0]
    assert KEY not in caplog.text
