"""A loopback HTTP proxy that sits in front of a trainer, records what passes and
injects faults.

Tests put it between the `null_trainer` fixture and a service client with
``shared.proxied``, which closes both on exit:

```python
async def test_something(null_trainer: LocalTrainer) -> None:
    async with proxied(null_trainer, FaultPlan(rate=0.2, seed=7)) as (proxy, service):
        ...
```

Faults (`FaultPlan.kinds`), each chosen for a request with probability ``rate`` from a
seeded RNG, or scripted one by one with `FaultProxy.inject`:

* ``cut_before``: drop the connection before the trainer sees the request;
* ``cut_after``: forward the request, then drop the connection instead of answering
  (the trainer did receive it: a retry must not execute it twice);
* ``status_503``: answer 503 without forwarding;
* ``status_429``: answer 429 with ``Retry-After`` without forwarding;
* ``delay``: forward, then hold the answer for ``delay`` seconds (longer than the
  client's timeout, it becomes a timeout after the trainer received the request);
* ``truncate``: forward, then send only half of the answer's body and drop the
  connection;
* ``status_400`` (scripted only): refuse the request with 400 without forwarding;
* ``complete_metadata`` (scripted only, for ``retrieve_future``): answer that the
  result is ready but large (wire.md §4.3, outcome 2) without forwarding.

Every request is recorded (`Recorded`: method, path, headers, parsed JSON body, the
fault it got, the client connection), which the wire-parity test uses with ``rate=0``;
``max_in_flight`` counts the most requests per path handled at once.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Iterable
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import web

__all__ = ["FAULT_KINDS", "SCRIPTED_KINDS", "FaultPlan", "FaultProxy", "Recorded"]

FAULT_KINDS = ("cut_before", "cut_after", "status_503", "status_429", "delay", "truncate")
# Faults that a retry cannot cure, only ever injected by script (`FaultProxy.inject`).
SCRIPTED_KINDS = ("status_400", "complete_metadata")
# Hop-by-hop and framing headers the proxy must not copy between connections.
_SKIP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)


@attrs.frozen(kw_only=True)
class FaultPlan:
    """Which faults to inject, and how often.

    Attributes:
        rate: Probability that a request gets a fault (0 records only).
        seed: Seed of the RNG that picks faulty requests and their kinds.
        kinds: The fault kinds to draw from.
        paths: Only requests to these paths can get a fault (None: every path).
        retry_after: The ``Retry-After`` seconds of an injected 429.
        delay: Seconds a ``delay`` fault holds the answer.
    """

    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = FAULT_KINDS
    paths: frozenset[str] | None = None
    retry_after: float = 0.05
    delay: float = 0.5

    def __attrs_post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")


@attrs.frozen
class Recorded:
    """One request that reached the proxy."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    fault: str | None
    peer: Any = None  # the client's (host, port): one per connection


class FaultProxy:
    """The proxy; an async context manager that serves on a free loopback port."""

    def __init__(self, target_url: str, plan: FaultPlan | None = None) -> None:
        self.target_url = target_url.rstrip("/")
        self.plan = plan or FaultPlan()
        self.records: list[Recorded] = []
        self.injected: collections.Counter[str] = collections.Counter()
        # Requests being handled now, and the most ever at once, per path.
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.max_in_flight: collections.Counter[str] = collections.Counter()
        self.base_url = ""
        self._rng = random.Random(self.plan.seed)
        self._scripted: collections.deque[tuple[str, str | None]] = collections.deque()
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ control

    def inject(self, kind: str, path: str | None = None, times: int = 1) -> None:
        """Give the next ``times`` requests (to ``path``, if given) the fault ``kind``."""
        if kind not in FAULT_KINDS + SCRIPTED_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        self._scripted.extend([(kind, path)] * times)

    def set_rate(self, rate: float) -> None:
        """Change the random fault rate (e.g. to 0 while a test checks results)."""
        self.plan = attrs.evolve(self.plan, rate=rate)

    def requests_to(self, path: str) -> list[Recorded]:
        """The recorded requests to ``path`` (e.g. ``/api/v1/forward``)."""
        return [r for r in self.records if r.path == path]

    def paths(self) -> Iterable[str]:
        return (r.path for r in self.records)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FaultProxy:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ proxying

    def _choose(self, path: str) -> str | None:
        for i, (kind, only) in enumerate(self._scripted):
            if only is None or only == path:
                del self._scripted[i]
                return kind
        plan = self.plan
        if plan.rate <= 0 or (plan.paths is not None and path not in plan.paths):
            return None
        if self._rng.random() >= plan.rate:
            return None
        return self._rng.choice(plan.kinds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.in_flight[path] += 1
        self.max_in_flight[path] = max(self.max_in_flight[path], self.in_flight[path])
        try:
            return await self._serve(request)
        finally:
            self.in_flight[path] -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        fault = self._choose(request.path)
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.records.append(
            Recorded(request.method, request.path, dict(request.headers), body, fault, peer)
        )
        if fault is not None:
            self.injected[fault] += 1
        if fault == "cut_before":
            return _cut(request)
        if fault == "complete_metadata":
            return web.json_response({"status": "complete_metadata", "response_payload_size": 1})
        if fault == "status_400":
            return web.json_response({"detail": "injected: refused"}, status=400)
        if fault == "status_503":
            return web.json_response({"detail": "injected: unavailable"}, status=503)
        if fault == "status_429":
            return web.json_response(
                {"detail": "injected: slow down"},
                status=429,
                headers={"Retry-After": str(self.plan.retry_after)},
            )
        status, headers, answer = await self._forward(request, raw)
        if fault == "cut_after":
            return _cut(request)
        if fault == "delay":
            await asyncio.sleep(self.plan.delay)
        if fault == "truncate" and len(answer) > 1:
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(answer)
            await response.prepare(request)
            await response.write(answer[: len(answer) // 2])
            return _cut(request)
        return web.Response(status=status, headers=headers, body=answer)

    async def _forward(self, request: web.Request, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
        async with self._http.request(
            request.method,
            self.target_url + request.path_qs,
            data=raw if raw else None,
            headers=headers,
        ) as upstream:
            answer = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIP_HEADERS}
            return upstream.status, out, answer


def _cut(request: web.Request) -> web.StreamResponse:
    """Drop the client's connection without an answer."""
    transport = request.transport
    if transport is not None:
        transport.close()
    # aiohttp treats a cancelled handler as a client that went away: no answer, no log.
    raise asyncio.CancelledError
