"""Connection hygiene shared by the local servers (the trainer and the deployment).

An aiohttp server on its own waits forever for a request head that never completes,
reads a trickled body for as long as the client likes, and accepts connections until
the process runs out of file descriptors (after which every accept attempt logs a
traceback). `ConnectionGuard` bounds all three:

* **Head timeout**: a connection must deliver a complete request head within
  ``head_timeout_seconds`` of opening, or of the first byte of its next request on a
  kept-alive connection; otherwise it gets a ``408`` and is closed.
* **Body timeout**: a request's body must have arrived ``body_timeout_seconds`` after
  its head; a read still waiting then raises `BodyTimeoutError`, answered with ``408``
  and the connection is closed.
* **Connection cap**: beyond ``max_connections`` open connections, a new one is
  answered ``503`` with ``Retry-After`` and closed at once, so descriptors stay free
  for the engine and for well-behaved clients. Refusals are logged as one summary line
  per interval, never one traceback each.

Use::

    guard = ConnectionGuard(limits, log)
    app = web.Application(middlewares=[...])
    guard.install(app)                    # before it serves
    runner, base_url = await guard.serve(app, host, port)

A server whose own error middleware turns exceptions into responses should answer
`BodyTimeoutError` with status ``408`` and its message (the guard closes the
connection either way).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiohttp import web

__all__ = ["BodyTimeoutError", "ConnectionGuard", "ConnectionLimits", "url_host"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: How often at most a summary of refused connections is logged.
REFUSAL_LOG_INTERVAL_SECONDS = 10.0


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 literals in brackets)."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    """How long a server waits for request heads and bodies, and how many connections
    it keeps open.

    Attributes:
        head_timeout_seconds: Time a connection has to deliver a complete request head.
        body_timeout_seconds: Time a request's body has to arrive after its head.
            Generous: a 64 MiB body needs far less on any network a trainer is used on.
        max_connections: Open connections at most; more are answered ``503``.
        idle_timeout_seconds: How long a kept-alive connection may sit idle between
            requests before the server closes it.
    """

    head_timeout_seconds: float = attrs.field(default=15.0, validator=_positive)
    body_timeout_seconds: float = attrs.field(default=120.0, validator=_positive)
    max_connections: int = attrs.field(default=512, validator=_positive)
    idle_timeout_seconds: float = attrs.field(default=75.0, validator=_positive)


class BodyTimeoutError(web.HTTPRequestTimeout):
    """A request body that did not arrive within the body timeout."""

    def __init__(self, seconds: float) -> None:
        message = f"the request body did not arrive within {seconds:g} s of its head"
        super().__init__(text=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _within_descriptor_limit(wanted: int, log: logging.Logger) -> int:
    """``wanted``, or half the process's descriptor limit if that is lower: connections
    must be refused by the guard, before ``accept`` runs out of descriptors (which
    asyncio logs with a traceback per attempt) and the engine cannot open its files."""
    try:
        import resource  # POSIX only

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY or wanted <= soft // 2:
        return wanted
    room = max(1, soft // 2)
    log.warning(
        "max_connections %d lowered to %d: the process may open only %d file descriptors",
        wanted,
        room,
        soft,
    )
    return room


def raw_response(status: int, reason: str, detail: str, error_class: str) -> bytes:
    """A complete HTTP/1.1 JSON error answer that closes the connection, for the
    moments when aiohttp is not handling the connection (refused, head timed out)."""
    body = json.dumps({"detail": detail, "error_class": error_class}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Retry-After: 1\r\n" if status == 503 else "")
        + "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """Head and body timeouts and a connection cap for one aiohttp server.

    Args:
        limits: The timeouts and the cap.
        log: Where refusals are summarized.
    """

    def __init__(self, limits: ConnectionLimits, log: logging.Logger) -> None:
        self.limits = limits
        self._log = log
        #: The connection cap in force: ``limits.max_connections``, or less when the
        #: process may not open that many descriptors.
        self.max_connections = _within_descriptor_limit(limits.max_connections, log)
        self._open: dict[asyncio.BaseTransport, _GuardedProtocol] = {}
        self._refused_since_log = 0
        self._last_refusal_log = float("-inf")
        #: Connections refused over the cap since the server started.
        self.refused_total = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def install(self, app: web.Application) -> None:
        """Add the guard's middleware to ``app`` as its outermost one."""
        app.middlewares.insert(0, self._middleware)

    async def serve(
        self, app: web.Application, host: str, port: int, **options: Any
    ) -> tuple[web.AppRunner, str]:
        """Serve ``app`` (`install`-ed) on ``host:port``, this guard watching every
        connection; return its runner, to ``cleanup`` when done, and its base URL.

        Args:
            app: The application.
            host: Interface to bind.
            port: Port to bind; 0 picks a free one.
            **options: More `web.AppRunner` options.

        Raises:
            OSError: The address cannot be bound (nothing is left running).
        """
        runner = web.AppRunner(
            app,
            access_log=None,  # the servers log requests themselves (`access_log`)
            handle_signals=False,
            keepalive_timeout=self.limits.idle_timeout_seconds,
            **options,
        )
        try:
            await runner.setup()
            await _GuardedSite(runner, host, port, self).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner, f"http://{url_host(host)}:{runner.addresses[0][1]}"

    # ------------------------------------------------------------------ connections

    def _protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, server)

    def _admit(self, protocol: _GuardedProtocol, transport: asyncio.BaseTransport) -> bool:
        if len(self._open) < self.max_connections:
            self._open[transport] = protocol
            return True
        self.refused_total += 1
        self._refused_since_log += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_SECONDS:
            self._log.warning(
                "refused %d connection(s): already %d open, the limit (max_connections)",
                self._refused_since_log,
                self.max_connections,
            )
            self._refused_since_log = 0
            self._last_refusal_log = now
        return False

    def _release(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)

    # ------------------------------------------------------------------ requests

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = self._open.get(request.transport) if request.transport else None
        if protocol is not None:
            protocol.head_received()
        loop = asyncio.get_running_loop()
        timed_out: list[bool] = []

        def expire_body() -> None:
            if not request.content.is_eof():
                timed_out.append(True)
                request.content.set_exception(BodyTimeoutError(self.limits.body_timeout_seconds))

        timer = loop.call_later(self.limits.body_timeout_seconds, expire_body)
        try:
            try:
                response = await handler(request)
            except BodyTimeoutError as exc:
                response = web.json_response(
                    {"detail": str(exc), "error_class": "RequestTimeoutError"}, status=408
                )
        finally:
            timer.cancel()
            if protocol is not None:
                protocol.request_done()
        if timed_out:
            # The rest of the body may still be on its way; never read it as a request.
            response.force_close()
        return response


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's request handler for one connection, behind the guard: it is admitted
    or refused, and its request heads are timed."""

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._guard._admit(self, transport):
            limit = self._guard.max_connections
            detail = f"the server has reached its limit of {limit} open connections; retry"
            transport.write(raw_response(503, "Service Unavailable", detail, "ServiceUnavailable"))
            transport.close()
            return
        self._arm_head_timer()
        self._inner = self._server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._in_request and self._head_timer is None:
            self._arm_head_timer()  # the first bytes of the next request on this connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._transport is not None:
            self._guard._release(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def head_received(self) -> None:
        self._in_request = True
        self._cancel_head_timer()

    def request_done(self) -> None:
        self._in_request = False

    def _arm_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._guard.limits.head_timeout_seconds, self._expire)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        transport = self._transport
        if self._in_request or transport is None or transport.is_closing():
            return
        seconds = self._guard.limits.head_timeout_seconds
        detail = f"no complete request head arrived within {seconds:g} s"
        transport.write(raw_response(408, "Request Timeout", detail, "RequestTimeoutError"))
        transport.close()


class _GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard):
        super().__init__(runner, host, port)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert isinstance(server, web.Server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard._protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
