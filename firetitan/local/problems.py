"""Error answers of the local servers: one `Problem` type and one error middleware.

The trainer and the deployment refuse requests the same way (a status, a message, a
short error code, sometimes ``Retry-After``) but speak two dialects: the trainer
answers ``{"detail", "error_class"}`` as tinker and the Fireworks training SDK read it,
the deployment ``{"error": {"code", "message"}}`` as the Fireworks inference API does.
An `ErrorDialect` holds what differs; `ErrorDialect.middleware` turns everything a
handler raises into that server's answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiohttp import web
from aiohttp.typedefs import Middleware

from firetitan.local.connections import BodyTimeoutError

__all__ = ["ErrorDialect", "Problem"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """An HTTP error answer: its status, a message naming what was wrong, the short
    error code of the server's dialect, and the seconds a client should wait before it
    retries (``Retry-After``), if any."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


@attrs.frozen(kw_only=True)
class ErrorDialect:
    """How one server words its error answers.

    Attributes:
        body: The JSON document of an answer.
        respond: Renders a JSON document with a status (the server's own encoder).
        timeout_code: The code of a 408 (the body came too slowly).
        too_large_code: The code of a 413.
        too_large: The 413 message, given the limit in bytes.
        internal_code: The code of a 500.
        http_code: The code of another aiohttp refusal (None: its class name).
        translate: The server's own exceptions as problems (None: not one of them).
        log: Where an internal error's traceback goes (at DEBUG; never to a client).
    """

    body: Callable[[Problem], Any]
    respond: Callable[[Any, int], web.Response]
    timeout_code: str
    too_large_code: str
    too_large: Callable[[int], str]
    internal_code: str
    http_code: str | None
    translate: Callable[[Exception], Problem | None] = lambda _exc: None
    log: logging.Logger

    def answer(self, problem: Problem) -> web.Response:
        response = self.respond(self.body(problem), problem.status)
        if problem.retry_after is not None:
            response.headers["Retry-After"] = str(problem.retry_after)
        return response

    def too_large_problem(self, limit: int) -> Problem:
        return Problem(413, self.too_large(limit), self.too_large_code)

    def middleware(self, max_request_bytes: int) -> Middleware:
        """The error middleware (install it outside the others but the access log):
        a handler's exception becomes this dialect's answer; a redirect passes."""

        @web.middleware
        async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except Exception as exc:
                problem = self._problem(exc, request, max_request_bytes)
                if problem is None:
                    raise
                return self.answer(problem)

        return errors

    def _problem(
        self, exc: Exception, request: web.Request, max_request_bytes: int
    ) -> Problem | None:
        if isinstance(exc, Problem):
            return exc
        known = self.translate(exc)
        if known is not None:
            return known
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return self.too_large_problem(max_request_bytes)
        if isinstance(exc, BodyTimeoutError):
            return Problem(408, str(exc), self.timeout_code)
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                return None
            code = self.http_code or type(exc).__name__
            return Problem(exc.status, f"{exc.reason}: {request.method} {request.path}", code)
        # Headers (and so the key) are never logged; the traceback stays server-side.
        self.log.debug("error handling %s %s", request.method, request.path, exc_info=True)
        message = f"internal error handling {request.path}: {type(exc).__name__}"
        return Problem(500, message, self.internal_code)
