"""Connection hygiene of the local trainer: request heads and bodies are timed out, open
connections are capped, and refusals never log a traceback each."""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

import pytest

from firetitan.local.connections import ConnectionGuard, ConnectionLimits

from .conftest import TrainerFactory
from .helpers import forward_body

pytestmark = pytest.mark.asyncio


async def _connect(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(base_url)
    assert url.hostname is not None and url.port is not None
    return await asyncio.open_connection(url.hostname, url.port)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """Status and JSON body of the one answer before the server closes the connection."""
    raw = await asyncio.wait_for(reader.read(), timeout=30)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def test_half_sent_head_gets_408_and_is_closed(make_trainer: TrainerFactory) -> None:
    async with make_trainer(head_timeout_seconds=0.3) as (trainer, api):
        reader, writer = await _connect(trainer.base_url)
        writer.write(b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: unfinished
        status, body = await _answer(reader)
        writer.close()
        assert status == 408
        assert body["detail"] == "no complete request head arrived within 0.3 s"
        assert await api.get("healthz") == (200, {"status": "ok"})  # the trainer serves on


async def test_connection_that_sends_nothing_is_closed(make_trainer: TrainerFactory) -> None:
    async with make_trainer(head_timeout_seconds=0.3) as (trainer, _api):
        reader, writer = await _connect(trainer.base_url)
        status, _body = await _answer(reader)
        writer.close()
        assert status == 408


async def test_trickled_body_gets_408_and_is_closed(make_trainer: TrainerFactory) -> None:
    async with make_trainer(body_timeout_seconds=0.3) as (trainer, api):
        reader, writer = await _connect(trainer.base_url)
        writer.write(
            b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\n"
            + f"X-API-Key: {trainer.api_key}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"tags"'
        )
        status, body = await _answer(reader)
        writer.close()
        assert status == 408
        assert body["detail"] == "the request body did not arrive within 0.3 s of its head"
        assert await api.get("healthz") == (200, {"status": "ok"})


async def test_slow_handler_is_not_a_head_timeout(make_trainer: TrainerFactory) -> None:
    """The head timer stops when the head is complete: a long-poll held longer than
    the head timeout is answered normally."""
    async with make_trainer(head_timeout_seconds=0.2, long_poll_seconds=0.8) as (_trainer, api):
        model_id = await api.model()
        # seq_id 5 waits for 1-4 (gap wait 20 s), so its poll is held for the long-poll.
        request_id = await api.submit("forward", forward_body(model_id, 5))
        assert (await api.poll(request_id))["type"] == "try_again"


async def test_connections_over_the_cap_get_503_without_tracebacks(
    make_trainer: TrainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_trainer(max_connections=3, head_timeout_seconds=60) as (trainer, api):
        idle = [await _connect(trainer.base_url) for _ in range(3)]
        await asyncio.sleep(0.1)  # the server has accepted them
        refused = []
        for _ in range(20):
            reader, writer = await _connect(trainer.base_url)
            refused.append(await _answer(reader))
            writer.close()
        assert {status for status, _ in refused} == {503}
        assert refused[0][1]["detail"] == (
            "the server has reached its limit of 3 open connections; retry"
        )
        for _reader, writer in idle:
            writer.close()
            await writer.wait_closed()
        for _ in range(100):  # the server notices the closed ones
            if trainer.server._guard.open_connections < 3:
                break
            await asyncio.sleep(0.05)
        assert await api.get("healthz") == (200, {"status": "ok"})
    refusal_logs = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusal_logs) == 1  # one summary line, not one per connection
    assert not any(r.exc_info for r in caplog.records)


async def test_the_cap_stays_within_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _what: (256, 4096))
    log = logging.getLogger("firetitan.local")
    assert ConnectionGuard(ConnectionLimits(max_connections=100), log).max_connections == 100
    assert ConnectionGuard(ConnectionLimits(max_connections=512), log).max_connections == 128
    assert "max_connections 512 lowered to 128" in caplog.text
