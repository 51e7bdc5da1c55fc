"""Fixtures for the async-core tests: a null-engine local trainer on loopback, a service
client connected to it, and a model on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from shared import BASE_MODEL, connect

from firetitan import AsyncFiretitanServiceClient, AsyncFiretitanTrainingClient
from firetitan.local import LocalTrainer


@pytest_asyncio.fixture
async def trainer(null_trainer: LocalTrainer) -> LocalTrainer:
    return null_trainer


@pytest_asyncio.fixture
async def service(trainer: LocalTrainer) -> AsyncIterator[AsyncFiretitanServiceClient]:
    async with connect(trainer.base_url, trainer.api_key) as client:
        yield client


@pytest_asyncio.fixture
async def tc(service: AsyncFiretitanServiceClient) -> AsyncFiretitanTrainingClient:
    """A full-parameter model on `service`."""
    return await service.create_training_client(BASE_MODEL)
