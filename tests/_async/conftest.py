"""Fixtures for the async-core tests: a null-engine local trainer on loopback, and a
service client connected to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from shared import connect

from firetitan import AsyncFiretitanServiceClient
from firetitan.local import LocalTrainer


@pytest_asyncio.fixture
async def trainer(null_trainer: LocalTrainer) -> LocalTrainer:
    return null_trainer


@pytest_asyncio.fixture
async def service(trainer: LocalTrainer) -> AsyncIterator[AsyncFiretitanServiceClient]:
    async with connect(trainer.base_url, trainer.api_key) as client:
        yield client
