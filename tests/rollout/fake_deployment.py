"""A scriptable in-test deployment (aiohttp) for the client's pitfall and fault tests.

It speaks deployment.md's control-plane, hot-load and completions shapes with a toy
"model": sample ``i`` of a request with seed ``s`` is ``[s % 97, s % 97 + 1, ...]``;
each generated row has ``logprob`` -1.0 and ``sampling_logprob`` -2.0, so a test can
tell which one the client used. Faults are queued per endpoint and consumed in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from shared import BASE_MODEL

from firetitan._wire import endpoints

KEY = "fake-deployment-key"
ACCOUNT = "acct"
DEPLOYMENT = "dep"
MODEL = f"accounts/{ACCOUNT}/deployments/{DEPLOYMENT}"


def loading_state(stage: str, identity: str, message: str | None = None) -> dict[str, Any]:
    """A replica's ``loading_state``: ``stage`` of loading snapshot ``identity``."""
    state: dict[str, Any] = {"stage": stage, "target_snapshot_identity": identity}
    if message is not None:
        state["message"] = message
    return state


class FakeDeployment:
    """State and knobs; `start` serves it on a free local port."""

    def __init__(self, replicas: int = 1) -> None:
        self.replicas: list[dict[str, Any]] = [
            {"replica_id": f"r{i}", "current_snapshot_identity": None, "readiness": True}
            for i in range(replicas)
        ]
        self.accounts = [{"name": f"accounts/{ACCOUNT}"}]
        self.hot_load_posts: list[dict[str, Any]] = []
        self.status_gets = 0
        self.completions: list[dict[str, Any]] = []  # {"body", "request_id", "peer"}
        self.post_faults: deque[str] = deque()
        self.completion_faults: deque[str] = deque()
        self.load_plan: Any = None  # callable(identity, replicas) run after each POST
        self.reject_reset_prompt_cache = False
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0  # seconds each completion takes
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> FakeDeployment:
        app = web.Application()
        handlers = {
            endpoints.LIST_ACCOUNTS: self._accounts,
            endpoints.HOT_LOAD: self._hot_load,
            endpoints.HOT_LOAD_STATUS: self._status,
            endpoints.COMPLETIONS: self._complete,
        }
        assert set(handlers) == {e for e in endpoints.ALL if e.server == "deployment"}
        for endpoint, handler in handlers.items():
            app.router.add_route(endpoint.method, endpoint.path, handler)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ handlers

    def _check(self, request: web.Request, *, bearer: bool) -> None:
        if request.headers.get("X-Api-Key") != KEY:
            raise web.HTTPUnauthorized(text='{"error": {"message": "bad key"}}')
        if bearer and request.headers.get("Authorization") != f"Bearer {KEY}":
            raise web.HTTPUnauthorized(text='{"error": {"message": "no bearer"}}')

    async def _accounts(self, request: web.Request) -> web.Response:
        self._check(request, bearer=False)
        return web.json_response({"accounts": self.accounts})

    def _check_target(self, request: web.Request) -> None:
        self._check(request, bearer=True)
        if request.headers.get("fireworks-deployment") != MODEL:
            raise web.HTTPNotFound(text='{"error": {"message": "unknown deployment"}}')
        if request.headers.get("fireworks-model") != BASE_MODEL:
            raise web.HTTPBadRequest(text='{"error": {"message": "base model mismatch"}}')

    async def _hot_load(self, request: web.Request) -> web.Response:
        self._check_target(request)
        body = await request.json()
        self.hot_load_posts.append(body)
        if self.post_faults:
            fault = self.post_faults.popleft()
            if fault == "503":
                return web.json_response({"error": {"message": "busy"}}, status=503)
            if fault == "empty":
                return web.Response(status=200, body=b"")
        if self.reject_reset_prompt_cache and "reset_prompt_cache" in body:
            message = "Extra inputs are not permitted, field: 'reset_prompt_cache'"
            return web.json_response({"error": {"message": message}}, status=400)
        if self.load_plan is not None:
            self.load_plan(body["identity"], self.replicas)
        else:
            for replica in self.replicas:
                replica["current_snapshot_identity"] = body["identity"]
                replica["readiness"] = True
        return web.json_response({})

    async def _status(self, request: web.Request) -> web.Response:
        self._check_target(request)
        self.status_gets += 1
        return web.json_response({"replicas": self.replicas})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self._check(request, bearer=True)
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.completions.append(
            {"body": body, "request_id": request.headers.get("x-request-id"), "peer": peer}
        )
        if body.get("model") != MODEL:
            return web.json_response({"error": {"message": "model not found"}}, status=404)
        fault = self.completion_faults.popleft() if self.completion_faults else ""
        if fault.startswith("429") or fault.startswith("503"):
            status, _, after = fault.partition(":")
            headers = {"Retry-After": after} if after else {}
            return web.json_response(
                {"error": {"message": "overloaded"}}, status=int(status), headers=headers
            )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._stream(request, body, fault)
        finally:
            self.in_flight -= 1

    async def _stream(
        self, request: web.Request, body: dict[str, Any], fault: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(obj: Any, event: str | None = None) -> None:
            text = obj if isinstance(obj, str) else json.dumps(obj)
            head = f"event: {event}\n" if event else ""
            await response.write(f"{head}data: {text}\n\n".encode())

        prompt = list(body["prompt"])
        start = (body.get("seed") or 0) % 97
        generated = [start + k for k in range(body["max_tokens"])]
        rows = []
        if body.get("echo"):
            rows = [{"token_id": t, "logprob": -0.5, "sampling_logprob": None} for t in prompt]
            rows[0]["logprob"] = None  # the first prompt row has no context
            for row in rows:
                if body.get("top_logprobs"):
                    row["top_logprobs"] = [{"token_id": 7, "logprob": -0.25}]
        rows += [{"token_id": t, "logprob": -1.0, "sampling_logprob": -2.0} for t in generated]
        for row in rows:
            await send({"choices": [{"index": 0, "text": "", "logprobs": {"content": [row]}}]})
        if fault == "truncate":
            await send("[DONE]")
            return response
        if fault.startswith("event-error"):
            status = int(fault.rpartition(":")[2])
            await send({"error": {"status_code": status, "message": "upstream"}}, "error")
            return response
        ids = (prompt if body.get("echo") else []) + generated
        final: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length"}
        if fault == "finish-error":
            final["finish_reason"] = "error"
        if fault != "no-raw-output":
            final["raw_output"] = {"prompt_token_ids": prompt, "completion_token_ids": ids}
        await send({"choices": [final], "usage": {"completion_tokens": len(generated)}})
        await send("[DONE]")
        return response


@contextlib.contextmanager
def fake_in_thread(replicas: int = 1) -> Iterator[FakeDeployment]:
    """A `FakeDeployment` served from a thread of its own, for blocking callers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = asyncio.run_coroutine_threadsafe(FakeDeployment(replicas).start(), loop).result(30)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
