"""Fixtures for the async-core tests: a null-engine local trainer on loopback, and a
service client connected to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from firetitan import AsyncFiretitanServiceClient
from firetitan.local import LocalTrainer

from .helpers import FAST_CLIENT


@pytest_asyncio.fixture
async def trainer(null_trainer: LocalTrainer) -> LocalTrainer:
    return null_trainer


@pytest_asyncio.fixture
async def service(trainer: LocalTrainer) -> AsyncIterator[AsyncFiretitanServiceClient]:
    async with AsyncFiretitanServiceClient(
        base_url=trainer.base_url, api_key=trainer.api_key, config=FAST_CLIENT
    ) as client:
        yield client
