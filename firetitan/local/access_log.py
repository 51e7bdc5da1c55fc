"""One log line per HTTP request the local servers answer (``--access-log``).

The line names the method, path, status and duration, plus the ids the request
concerned (model, seq, request) where there are any; headers and bodies are never
logged, so neither is the API key. Handlers add the ids with `note` as they learn them
(after decoding a body, say); the middleware collects them per request through a
context variable, so that no handler needs the request object to do so.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from firetitan.cli_logging import ACCESS_LOGGER

__all__ = ["middleware", "note"]

log = logging.getLogger(ACCESS_LOGGER)

_ids: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "firetitan_access_ids", default=None
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def note(**ids: object) -> None:
    """Name ids (``model_id=``, ``seq_id=``, ...) on the current request's access line.

    Does nothing outside a request or when the access log is off.
    """
    current = _ids.get()
    if current is not None:
        current.update(ids)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log the request once it is answered; install it outermost, so that the status is
    the one sent (errors already turned into their JSON answers)."""
    if not log.isEnabledFor(logging.INFO):
        return await handler(request)
    ids: dict[str, object] = {}
    token = _ids.set(ids)
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer (nginx's convention)
        raise
    finally:
        _ids.reset(token)
        elapsed_ms = 1e3 * (time.monotonic() - started)
        named = "".join(f" {key}={value}" for key, value in ids.items() if value is not None)
        log.info("%s %s %d %.1f ms%s", request.method, request.path, status, elapsed_ms, named)
