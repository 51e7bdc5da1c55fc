"""Constants and helpers every test directory shares (``from shared import ...``).

`Surface` runs one test body through either client surface: the async core or the
blocking facade. The design promises that both behave alike wherever their behaviour
is the same; tests written against `Surface` check that promise on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from firetitan import (
    APIFuture,
    AsyncFiretitanServiceClient,
    ClientConfig,
    FiretitanServiceClient,
    RetryPolicy,
    Timeouts,
)

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"

# Quick waits, so retries and long-polls happen in milliseconds.
FAST_TRAINER: dict[str, Any] = {
    "long_poll_seconds": 1.0,
    "gap_wait_seconds": 20.0,
    "maintenance_interval_seconds": 0.05,
}
FAST_CLIENT = ClientConfig(
    timeouts=Timeouts(connect=2.0, request=10.0, long_poll_read=10.0),
    retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.2, deadline=30.0, max_retry_after=0.5),
    future_deadline=60.0,
    heartbeat_interval=0.2,
)


def connect(
    base_url: str, api_key: str, config: ClientConfig = FAST_CLIENT
) -> AsyncFiretitanServiceClient:
    """An async service client with the tests' quick settings (``async with`` it)."""
    return AsyncFiretitanServiceClient(base_url=base_url, api_key=api_key, config=config)


class Surface:
    """One client surface, driven from an async test.

    ``await surface.call(obj.method, *args)`` calls a client method and waits for its
    outcome: on the async surface it awaits the coroutine or future; on the facade it
    calls the blocking method off the event loop (as a sync program would, from a
    thread) and waits for an `APIFuture` with ``result()``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @contextlib.asynccontextmanager
    async def service(self, base_url: str, api_key: str) -> AsyncIterator[Any]:
        """A service client of this surface, closed on exit."""
        if self.name == "async":
            async with connect(base_url, api_key) as client:
                yield client
            return
        blocking = await asyncio.to_thread(
            FiretitanServiceClient, base_url=base_url, api_key=api_key, config=FAST_CLIENT
        )
        try:
            yield blocking
        finally:
            await asyncio.to_thread(blocking.close)

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.name == "async":
            outcome = method(*args, **kwargs)
            return await outcome if inspect.isawaitable(outcome) else outcome
        outcome = await asyncio.to_thread(method, *args, **kwargs)
        if isinstance(outcome, APIFuture):
            return await asyncio.to_thread(outcome.result)
        return outcome


SURFACES = (Surface("async"), Surface("sync"))
