"""Fixtures shared by every test directory: a null-engine trainer on loopback, and a
service client of either surface (async core or blocking facade) connected to it, with
a model.
Constants and the `Surface` driver live in ``shared.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from shared import BASE_MODEL, FAST_TRAINER, SURFACES, Surface

from firetitan.local import LocalTrainer


@pytest_asyncio.fixture
async def null_trainer() -> AsyncIterator[LocalTrainer]:
    """A null-engine trainer on loopback, with quick waits."""
    async with LocalTrainer("null", **FAST_TRAINER) as local:
        yield local


@pytest.fixture(params=SURFACES, ids=str)
def surface(request: pytest.FixtureRequest) -> Surface:
    """Each test that takes it runs twice: through the async core and the facade."""
    chosen: Surface = request.param
    return chosen


@pytest_asyncio.fixture
async def any_service(surface: Surface, null_trainer: LocalTrainer) -> AsyncIterator[Any]:
    """A service client of `surface`, connected to `null_trainer`."""
    async with surface.service(null_trainer.base_url, null_trainer.api_key) as client:
        yield client


@pytest_asyncio.fixture
async def any_model(surface: Surface, any_service: Any) -> Any:
    """A full-parameter model on `any_service`, of the same surface."""
    return await surface.call(any_service.create_training_client, BASE_MODEL)
