"""Fixtures for protocol-level tests of the local trainer: a null-engine trainer on
loopback, driven by a raw aiohttp client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest_asyncio
from shared import FAST_TRAINER

from firetitan.local import LocalTrainer

from .helpers import Api

# The shared quick waits (the gap wait stays long, so that a test sees a gap skipped only
# by the rule it checks), with polls held a little longer; tests that need other
# timings pass their own.
FAST = {**FAST_TRAINER, "long_poll_seconds": 2.0}

TrainerFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[LocalTrainer, Api]]]
ModelFactory = Callable[
    ..., contextlib.AbstractAsyncContextManager[tuple[LocalTrainer, Api, str]]
]


@pytest_asyncio.fixture
async def make_trainer() -> AsyncIterator[TrainerFactory]:
    """``async with make_trainer(**limits) as (trainer, api)``: a trainer on loopback
    (null engine unless ``engine=`` says otherwise) and a raw client for it."""

    @contextlib.asynccontextmanager
    async def factory(**options: Any) -> AsyncIterator[tuple[LocalTrainer, Api]]:
        engine = options.pop("engine", "null")
        async with (
            LocalTrainer(engine, **{**FAST, **options}) as trainer,
            aiohttp.ClientSession() as http,
        ):
            yield trainer, Api(http, trainer.base_url, trainer.api_key)

    yield factory


@pytest_asyncio.fixture
async def trainer_api(make_trainer: TrainerFactory) -> AsyncIterator[tuple[LocalTrainer, Api]]:
    async with make_trainer() as pair:
        yield pair


@pytest_asyncio.fixture
async def make_model(make_trainer: TrainerFactory) -> AsyncIterator[ModelFactory]:
    """``async with make_model(**limits) as (trainer, api, model_id)``: `make_trainer`'s
    pair and a full-parameter model created through ``api`` in a new session."""

    @contextlib.asynccontextmanager
    async def factory(**options: Any) -> AsyncIterator[tuple[LocalTrainer, Api, str]]:
        async with make_trainer(**options) as (trainer, api):
            yield trainer, api, await api.model()

    yield factory


@pytest_asyncio.fixture
async def trainer_model(trainer_api: tuple[LocalTrainer, Api]) -> tuple[LocalTrainer, Api, str]:
    """`trainer_api` and a full-parameter model created through its ``api``."""
    trainer, api = trainer_api
    return trainer, api, await api.model()
