"""The scriptable deployment the rollout tests hot-load onto."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from .fake_deployment import FakeDeployment


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDeployment]:
    """A `FakeDeployment` with two replicas, started."""
    server = await FakeDeployment(replicas=2).start()
    yield server
    await server.stop()
