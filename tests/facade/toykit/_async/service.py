"""`AsyncToyService`: a service client with an aiohttp session born on the running loop."""

from __future__ import annotations

import asyncio
import contextvars

import aiohttp

from firetitan._read_only import ReadOnly

from .training import AsyncToyTraining

__all__ = ["USER", "AsyncToyService"]

#: A context variable that the tests set in the calling thread.
USER: contextvars.ContextVar[str] = contextvars.ContextVar("toy_user", default="anonymous")


class AsyncToyService:
    """A toy service client.

    Created off the loop; opened (an aiohttp session) in `__aenter__`.
    """

    def __init__(
        self, base_url: str, api_key: str | None = None, *, fail_open: bool = False
    ) -> None:
        """Remember the settings; touches neither the loop nor the network.

        Args:
            base_url: Where the (imaginary) trainer listens.
            api_key: The key.
            fail_open: Make `__aenter__` fail after creating the session.
        """
        self._base_url = base_url
        self._fail_open = fail_open
        self._session: aiohttp.ClientSession | None = None
        self._clients: list[AsyncToyTraining] = []
        self.opened = 0
        self.closed = False

    base_url: ReadOnly[str] = ReadOnly("_base_url", "The trainer's URL.")

    async def __aenter__(self) -> AsyncToyService:
        """Open the session."""
        self.opened += 1
        if self._session is None:
            self._session = aiohttp.ClientSession()
        if self._fail_open:
            raise ConnectionError("the toy trainer refused the connection")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the client."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session and every training client."""
        for client in self._clients:
            await client.aclose()
        if self._session is not None:
            await self._session.close()
        self.closed = True

    async def create_training_client(
        self, name: str, *, log: list[str] | None = None
    ) -> AsyncToyTraining:
        """Create a training client.

        Args:
            name: Its name.
            log: An execution log to append to.

        Returns:
            The new client.
        """
        client = AsyncToyTraining(name, [] if log is None else log)
        self._clients.append(client)
        return client

    async def find(self, name: str) -> AsyncToyTraining | None:
        """Return the training client called `name`, if any."""
        return next((c for c in self._clients if c.name == name), None)

    async def clients(self) -> list[AsyncToyTraining]:
        """Return every training client."""
        return list(self._clients)

    async def current_user(self) -> str:
        """Return the `USER` context variable as the loop sees it."""
        return USER.get()

    async def sleep(self, seconds: float) -> float:
        """Sleep; records a cancellation in `cancelled_sleeps`."""
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled_sleeps = getattr(self, "cancelled_sleeps", 0) + 1
            raise
        return seconds

    def resolve(self, name: str, /, job: str | None = None) -> str:
        """Return a checkpoint path (pure).

        Args:
            name: The checkpoint.
            job: The job that saved it.
        """
        return name if job is None else f"cross_job://{job}/{name}"

    @staticmethod
    def version() -> str:
        """Return the toy's version."""
        return "1.0"
