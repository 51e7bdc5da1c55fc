"""The deployment shares the trainer's connection hygiene (`ConnectionGuard`): request
heads time out and open connections are capped."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from firetitan.local.connections import ConnectionLimits

from .helpers import Deployment, Snapshots

pytestmark = pytest.mark.asyncio


async def _status_of_answer(reader: asyncio.StreamReader) -> int:
    raw = await asyncio.wait_for(reader.read(), timeout=30)
    return int(raw.split(b" ", 2)[1])


async def test_half_sent_heads_time_out_and_connections_are_capped(snapshots: Snapshots) -> None:
    limits = ConnectionLimits(head_timeout_seconds=0.5, max_connections=2)
    async with Deployment.running(snapshots.root, connection_limits=limits) as dep:
        url = urlsplit(dep.url)
        assert url.hostname is not None and url.port is not None
        opened = [await asyncio.open_connection(url.hostname, url.port) for _ in range(3)]
        for _reader, writer in opened:
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never finished
        statuses = [await _status_of_answer(reader) for reader, _writer in opened]
        for _reader, writer in opened:
            writer.close()
        assert sorted(statuses) == [408, 408, 503]  # two timed out, one over the cap
