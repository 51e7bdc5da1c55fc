"""The peers: the same workloads through each client, run inside a worker process.

* ``floor``: raw aiohttp with pre-encoded bodies on keep-alive connections, to the same
  endpoints, polling the oldest four results at a time, and reading each answer only as
  far as needed (the ACK's ``request_id``; ``try_again`` or not). What the SDKs cost on
  top of it is their own; no client on this stack can do the same work for less.
* ``firetitan-async``: `firetitan.AsyncFiretitanServiceClient`.
* ``firetitan-sync``: `firetitan.FiretitanServiceClient`, the blocking facade.
* ``firetitan-json``: the async core asking for JSON results only (B3).
* ``fireworks``: the public fireworks-ai training SDK, with its own types.
* ``tinker``: the public tinker SDK (LoRA; the null engine ignores the difference).
* ``facade``: firetitan's async core and facade in one process, alternating (B4).
* ``torch-sdk`` / ``torch-plain``: B6, SFT steps through the SDK, or in-process.
* ``rl``: the demo's RL step against a torch-engine trainer (the RL step profile).

Every workload method returns a JSON-able dict: lists of per-call seconds (``wall``,
``cpu``), or totals for B2, or memory figures for B5.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import attrs
import numpy as np

from benchmarks._common import (
    B1_TOKENS,
    B3_DATUMS,
    B3_TOKENS,
    B6_DATUMS,
    B6_TOKENS,
    B6_VOCAB,
    BASE_MODEL,
    Arrays,
    Lists,
    batch_arrays,
    batch_lists,
    cpu_seconds,
    measure_calls,
    measure_calls_async,
    rss_mb,
)

__all__ = ["make"]

LOSS = "cross_entropy"
# Every peer polls the trainer the same way: at most this many long-polls per model.
POLLS = 4


def make(name: str, url: str, key: str) -> Any:
    """The peer called ``name``.

    Raises:
        ValueError: Unknown name.
    """
    peers: dict[str, Any] = {
        "floor": FloorPeer,
        "firetitan-async": FiretitanAsyncPeer,
        "firetitan-sync": FiretitanSyncPeer,
        "firetitan-json": FiretitanJsonPeer,
        "fireworks": FireworksPeer,
        "tinker": TinkerPeer,
        "facade": FacadePeer,
        "torch-sdk": TorchSdkPeer,
        "torch-plain": TorchPlainPeer,
        "rl": RlStepPeer,
    }
    if name not in peers:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(peers)}")
    return peers[name](url, key)


def small_arrays() -> Arrays:
    return batch_arrays(1, B1_TOKENS)


def large_arrays() -> Arrays:
    return batch_arrays(B3_DATUMS, B3_TOKENS, seed=3)


def large_lists() -> Lists:
    return batch_lists(B3_DATUMS, B3_TOKENS, seed=3)


#: B3's two ways of building the batch: ``arrays``, datums built once from numpy arrays
#: and reused by every call; ``lists``, datums built from plain Python lists by each
#: call (inside its timing), as a training loop builds each step's batch.
B3_BUILDS = ("arrays", "lists")


def datums_from_lists(types: Any, lists: Lists) -> list[Any]:
    """Datums of the SDK whose types module is ``types`` (tinker's, or the Fireworks
    SDK's, which has the same names), from plain lists: each SDK converts them."""
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens),
            loss_fn_inputs={"target_tokens": targets, "weights": weights},
        )
        for tokens, targets, weights in lists
    ]


def datums_from_arrays(types: Any, arrays: Arrays) -> list[Any]:
    """Datums of the SDK whose types module is ``types`` (as `datums_from_lists`), from
    numpy arrays."""
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens.tolist()),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(targets),
                "weights": types.TensorData.from_numpy(weights),
            },
        )
        for tokens, targets, weights in arrays
    ]


def tinker_batch(arrays: Arrays) -> list[Any]:
    import tinker

    return datums_from_arrays(tinker, arrays)


def floor_datum(tokens: Any, targets: Any, weights: Any) -> dict[str, Any]:
    """One datum as the protocol's JSON spells it, from numpy arrays (the floor's)."""

    def tensor(values: Any) -> dict[str, Any]:
        return {"data": values.tolist(), "dtype": str(values.dtype), "shape": list(values.shape)}

    return {
        "model_input": {"chunks": [{"tokens": tokens.tolist(), "type": "encoded_text"}]},
        "loss_fn_inputs": {"target_tokens": tensor(targets), "weights": tensor(weights)},
    }


def _rss_result(base: dict[str, float], in_flight: dict[str, float], wall: float) -> dict[str, Any]:
    end = rss_mb()
    return {
        "base_rss": base["rss"],
        "in_flight_rss": in_flight.get("rss", 0.0),
        "peak_rss": end["peak"],
        "wall": wall,
    }


# --------------------------------------------------------------------------- firetitan


class FiretitanAsyncPeer:
    """firetitan's async core on the worker's event loop."""

    is_async = True

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.small = tinker_batch(small_arrays())
        self.large: list[Any] | None = None

    async def setup(self) -> None:
        import tinker

        from firetitan import AsyncFiretitanServiceClient

        self.adam = tinker.AdamParams(learning_rate=1e-4)
        self.service = AsyncFiretitanServiceClient(base_url=self.url, api_key=self.key)
        await self.service.__aenter__()
        self.tc = await self.service.create_training_client(BASE_MODEL, lora_rank=0)
        await self.tc.forward(self.small, LOSS)
        await self.tc.forward_backward(self.small, LOSS)
        await self.tc.optim_step(self.adam)

    async def close(self) -> None:
        await self.service.aclose()

    async def b1(self, calls: int) -> dict[str, Any]:
        tc, data = self.tc, self.small
        return await measure_calls_async(lambda: tc.forward(data, LOSS), calls)

    async def b2(self, pairs: int) -> dict[str, Any]:
        tc, data, adam = self.tc, self.small, self.adam
        c0, t0 = cpu_seconds(), time.perf_counter()
        futures: list[Any] = []
        for _ in range(pairs):
            futures.append(tc.forward_backward(data, LOSS))
            futures.append(tc.optim_step(adam))
        for future in futures:
            await future
        return {"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0}

    async def b3(self, calls: int, build: str = "arrays") -> dict[str, Any]:
        import tinker

        tc = self.tc
        if build == "lists":
            lists = large_lists()
            await tc.forward_backward(datums_from_lists(tinker, lists), LOSS)  # warm-up
            return await measure_calls_async(
                lambda: tc.forward_backward(datums_from_lists(tinker, lists), LOSS), calls
            )
        if self.large is None:
            self.large = tinker_batch(large_arrays())
            await tc.forward_backward(self.large, LOSS)  # warm-up
        data = self.large
        return await measure_calls_async(lambda: tc.forward_backward(data, LOSS), calls)

    async def b5(self, futures: int) -> dict[str, Any]:
        tc, data = self.tc, self.small
        base = rss_mb()
        t0 = time.perf_counter()
        pending = [tc.forward(data, LOSS) for _ in range(futures)]
        in_flight = rss_mb()
        for future in pending:
            await future
        return _rss_result(base, in_flight, time.perf_counter() - t0)


class FiretitanJsonPeer(FiretitanAsyncPeer):
    """firetitan's async core with protobuf results turned off: every result is JSON,
    as a trainer that offers nothing else sends it (B3 only)."""

    async def setup(self) -> None:
        import tinker

        from firetitan import AsyncFiretitanServiceClient, ClientConfig

        config = ClientConfig()
        config = config.evolve(limits=attrs.evolve(config.limits, protobuf_result_bytes=None))
        self.adam = tinker.AdamParams(learning_rate=1e-4)
        self.service = AsyncFiretitanServiceClient(
            base_url=self.url, api_key=self.key, config=config
        )
        await self.service.__aenter__()
        self.tc = await self.service.create_training_client(BASE_MODEL, lora_rank=0)
        await self.tc.forward(self.small, LOSS)


class _FuturesPeer:
    """A client whose training calls return futures with ``result()``: firetitan's facade
    and the public SDKs. Subclasses say how to connect and how to build a batch."""

    is_async = False

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.small = self._batch(small_arrays())
        self.large: list[Any] | None = None

    def _batch(self, arrays: Arrays) -> list[Any]:
        return tinker_batch(arrays)

    def _batch_from_lists(self, lists: Lists) -> list[Any]:
        import tinker

        return datums_from_lists(tinker, lists)

    def _connect(self) -> tuple[Any, Any, Any]:
        """Return ``(service, training client, Adam parameters)``."""
        raise NotImplementedError

    def setup(self) -> None:
        self.service, self.tc, self.adam = self._connect()
        # Warm every path measured below, so no peer pays first-call costs in a round.
        self.tc.forward(self.small, LOSS).result()
        self.tc.forward_backward(self.small, LOSS).result()
        self.tc.optim_step(self.adam).result()

    def close(self) -> None:
        self.service.close()

    def b1(self, calls: int) -> dict[str, Any]:
        tc, data = self.tc, self.small
        return measure_calls(lambda: tc.forward(data, LOSS).result(), calls)

    def b2(self, pairs: int) -> dict[str, Any]:
        c0, t0 = cpu_seconds(), time.perf_counter()
        futures: list[Any] = []
        for _ in range(pairs):
            futures.append(self.tc.forward_backward(self.small, LOSS))
            futures.append(self.tc.optim_step(self.adam))
        for future in futures:
            future.result()
        return {"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0}

    def b3(self, calls: int, build: str = "arrays") -> dict[str, Any]:
        tc = self.tc
        if build == "lists":
            lists, make = large_lists(), self._batch_from_lists
            tc.forward_backward(make(lists), LOSS).result()  # warm-up
            return measure_calls(lambda: tc.forward_backward(make(lists), LOSS).result(), calls)
        if self.large is None:
            self.large = self._batch(large_arrays())
            tc.forward_backward(self.large, LOSS).result()
        data = self.large
        return measure_calls(lambda: tc.forward_backward(data, LOSS).result(), calls)

    def b5(self, futures: int) -> dict[str, Any]:
        base = rss_mb()
        t0 = time.perf_counter()
        pending = [self.tc.forward(self.small, LOSS) for _ in range(futures)]
        in_flight = rss_mb()
        for future in pending:
            future.result()
        return _rss_result(base, in_flight, time.perf_counter() - t0)


class FiretitanSyncPeer(_FuturesPeer):
    """firetitan's blocking facade (its own event-loop thread does the I/O)."""

    def _connect(self) -> tuple[Any, Any, Any]:
        import tinker

        from firetitan import FiretitanServiceClient

        service = FiretitanServiceClient(base_url=self.url, api_key=self.key)
        tc = service.create_training_client(BASE_MODEL, lora_rank=0)
        return service, tc, tinker.AdamParams(learning_rate=1e-4)


# --------------------------------------------------------------------------- public SDKs


class FireworksPeer(_FuturesPeer):
    """The public fireworks-ai training SDK (``fireworks.training.sdk``), with its own types."""

    def _batch(self, arrays: Arrays) -> list[Any]:
        from fireworks.training.sdk import types as fw

        return datums_from_arrays(fw, arrays)

    def _batch_from_lists(self, lists: Lists) -> list[Any]:
        from fireworks.training.sdk import types as fw

        return datums_from_lists(fw, lists)

    def _connect(self) -> tuple[Any, Any, Any]:
        from fireworks.training.sdk import AdamParams, FiretitanServiceClient

        service = FiretitanServiceClient(base_url=self.url, api_key=self.key)
        tc = service.create_training_client(BASE_MODEL, lora_rank=0)
        return service, tc, AdamParams(learning_rate=1e-4)


class TinkerPeer(_FuturesPeer):
    """The public tinker SDK (its ``ServiceClient``, futures with ``result()``)."""

    def _connect(self) -> tuple[Any, Any, Any]:
        import tinker

        service = tinker.ServiceClient(base_url=self.url, api_key=self.key)
        tc = service.create_lora_training_client(BASE_MODEL, rank=8)
        return service, tc, tinker.AdamParams(learning_rate=1e-4)

    def close(self) -> None:
        close = getattr(self.service, "close", None)
        if callable(close):
            close()


# --------------------------------------------------------------------------- raw floor


class FloorPeer:
    """Raw aiohttp: the least any client on this stack can do for the same work."""

    is_async = True

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    async def setup(self) -> None:
        import aiohttp
        import orjson

        self._loads = orjson.loads
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=60.0),
            headers={"X-API-Key": self.key, "Content-Type": "application/json"},
        )
        api = self.url + "/api/v1/"
        self.urls = {
            name: api + name
            for name in ("forward", "forward_backward", "optim_step", "retrieve_future")
        }
        # Bodies written by hand as the protocol spells them (shared/spec/wire.md), with
        # orjson alone: no SDK's types or codec.
        session = await self._post(
            api + "create_session",
            orjson.dumps({"tags": [], "user_metadata": {}, "sdk_version": "0.23.0",
                          "type": "create_session"}),
        )  # fmt: skip
        create = {
            "session_id": session["session_id"], "model_seq_id": 0, "base_model": BASE_MODEL,
            "lora_config": {"rank": 0, "train_unembed": True, "train_mlp": True,
                            "train_attn": True},
            "type": "create_model",
        }  # fmt: skip
        ack = await self._post(api + "create_model", orjson.dumps(create))
        await self._poll(ack["request_id"])
        self.model_id = ack["model_id"]
        self.seq = 0

        def template(body: dict[str, Any]) -> bytes:
            # Everything but the seq_id is encoded once; each call splices its seq_id in.
            return orjson.dumps({**body, "model_id": self.model_id})[1:]

        def forward(arrays: Arrays, forward_only: bool) -> bytes:
            field = "forward_input" if forward_only else "forward_backward_input"
            data = [floor_datum(*datum) for datum in arrays]
            return template({field: {"data": data, "loss_fn": LOSS}, "comms": "v2"})

        self.forward_body = forward(small_arrays(), True)
        self.fb_body = forward(small_arrays(), False)
        self.large_body: bytes | None = None
        self._large_template = lambda: forward(large_arrays(), False)
        adam = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
                "weight_decay": 0.0, "grad_clip_norm": 0.0}  # fmt: skip
        self.optim_body = template({"adam_params": adam, "type": "optim_step"})
        await self._call("forward", self.forward_body)

    async def close(self) -> None:
        await self.http.close()

    async def _post(self, url: str, data: bytes) -> Any:
        async with self.http.post(url, data=data) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: HTTP {response.status}: {body[:200]!r}")
        return self._loads(body)

    async def _submit(self, endpoint: str, template: bytes) -> str:
        self.seq += 1
        ack = await self._post(self.urls[endpoint], b'{"seq_id":%d,' % self.seq + template)
        request_id: str = ack["request_id"]
        return request_id

    async def _poll(self, request_id: str) -> None:
        body = b'{"request_id":"%s","allow_metadata_only":true}' % request_id.encode()
        while True:
            async with self.http.post(self.urls["retrieve_future"], data=body) as response:
                answer = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"retrieve_future: HTTP {response.status}")
            # The trainer writes the outcome's discriminator first; a result needs no
            # further reading to know it arrived.
            if b'"try_again"' not in answer[:40]:
                if answer.startswith(b'{"error"'):
                    raise RuntimeError(answer[:200].decode())
                return

    async def _call(self, endpoint: str, template: bytes) -> None:
        await self._poll(await self._submit(endpoint, template))

    async def _pipeline(self, bodies: list[tuple[str, bytes]]) -> None:
        """Submit in order, each after the previous ACK; poll the oldest POLLS at once."""
        ids: asyncio.Queue[str | None] = asyncio.Queue()

        async def submit() -> None:
            for endpoint, template in bodies:
                ids.put_nowait(await self._submit(endpoint, template))
            for _ in range(POLLS):
                ids.put_nowait(None)

        async def poll() -> None:
            while (request_id := await ids.get()) is not None:
                await self._poll(request_id)

        await asyncio.gather(submit(), *(poll() for _ in range(POLLS)))

    async def b1(self, calls: int) -> dict[str, Any]:
        body = self.forward_body
        return await measure_calls_async(lambda: self._call("forward", body), calls)

    async def b2(self, pairs: int) -> dict[str, Any]:
        bodies = [("forward_backward", self.fb_body), ("optim_step", self.optim_body)] * pairs
        c0, t0 = cpu_seconds(), time.perf_counter()
        await self._pipeline(bodies)
        return {"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0}

    async def b3(self, calls: int, build: str = "arrays") -> dict[str, Any]:
        # The floor's body is encoded in advance, however the batch was built.
        del build
        if self.large_body is None:
            self.large_body = self._large_template()
            await self._call("forward_backward", self.large_body)
        body = self.large_body
        return await measure_calls_async(lambda: self._call("forward_backward", body), calls)

    async def b5(self, futures: int) -> dict[str, Any]:
        base = rss_mb()
        t0 = time.perf_counter()
        # The floor's "futures in flight" are its pre-encoded bodies and poll tasks.
        bodies = [("forward", self.forward_body)] * futures
        in_flight = rss_mb()
        await self._pipeline(bodies)
        return _rss_result(base, in_flight, time.perf_counter() - t0)


# --------------------------------------------------------------------------- B4: facade


class FacadePeer:
    """The same call through firetitan's async core and its facade, in one process,
    alternating in short blocks, so both see the same machine state (B4)."""

    is_async = False

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.small = tinker_batch(small_arrays())

    def setup(self) -> None:
        from firetitan import AsyncFiretitanServiceClient, FiretitanServiceClient

        self.runner = asyncio.Runner()

        async def open_async() -> Any:
            service = AsyncFiretitanServiceClient(base_url=self.url, api_key=self.key)
            await service.__aenter__()
            tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
            await tc.forward(self.small, LOSS)
            return service, tc

        self.async_service, self.async_tc = self.runner.run(open_async())
        self.service = FiretitanServiceClient(base_url=self.url, api_key=self.key)
        # A second model of the same base needs another seed on one service client;
        # here each surface has its own service client, so the defaults do.
        self.tc = self.service.create_training_client(BASE_MODEL, lora_rank=0)
        self.tc.forward(self.small, LOSS).result()

    def close(self) -> None:
        self.service.close()
        self.runner.run(self.async_service.aclose())
        self.runner.close()

    def b4(self, calls: int, block: int = 10) -> dict[str, Any]:
        """Per-call seconds of each surface, in alternating blocks: call to result
        (wall and CPU), and until the call returned its future (``submit``)."""
        data, tc, atc = self.small, self.tc, self.async_tc
        out: dict[str, list[float]] = {
            f"{surface}_{what}": []
            for surface in ("async", "sync")
            for what in ("wall", "cpu", "submit")
        }

        async def async_block(n: int) -> None:
            for _ in range(n):
                c0, t0 = cpu_seconds(), time.perf_counter()
                future = atc.forward(data, LOSS)
                t1 = time.perf_counter()
                await future
                t2, c2 = time.perf_counter(), cpu_seconds()
                out["async_submit"].append(t1 - t0)
                out["async_wall"].append(t2 - t0)
                out["async_cpu"].append(c2 - c0)

        def sync_block(n: int) -> None:
            for _ in range(n):
                c0, t0 = cpu_seconds(), time.perf_counter()
                future = tc.forward(data, LOSS)
                t1 = time.perf_counter()
                future.result()
                t2, c2 = time.perf_counter(), cpu_seconds()
                out["sync_submit"].append(t1 - t0)
                out["sync_wall"].append(t2 - t0)
                out["sync_cpu"].append(c2 - c0)

        done = 0
        while done < calls:
            n = min(block, calls - done)
            self.runner.run(async_block(n))
            sync_block(n)
            done += n
        return {**out, **self._handoffs(calls)}

    @staticmethod
    def _handoffs(calls: int) -> dict[str, list[float]]:
        """The `HANDOFFS` on an event-loop thread of their own: what any facade over a
        loop thread pays per call at the least."""
        import threading

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="handoffs", daemon=True)
        thread.start()
        try:
            out = {}
            for name, round_trip in handoffs(loop).items():
                for _ in range(20):
                    round_trip()
                out[f"handoff_{name}"] = measure_calls(round_trip, calls)["wall"]
            return out
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


#: Cross-thread round trips between a caller and an event-loop thread, cheapest first
#: (B4 measures each beside the facade's own hop).
HANDOFFS = {
    "lock": "a plain lock the loop releases (`call_soon_threadsafe` + `Lock.acquire`)",
    "future": "`call_soon_threadsafe` + `concurrent.futures.Future.result()`",
    "coroutine": "`asyncio.run_coroutine_threadsafe(...).result()`",
    "anyio": "anyio's `BlockingPortal.call` (its own event-loop thread)",
}


_KEEP: list[Any] = []


def handoffs(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """One round trip per `HANDOFFS` entry: the caller hands a no-op to the loop thread
    and blocks until it ran."""
    import concurrent.futures
    import threading

    def lock() -> None:
        done = threading.Lock()
        done.acquire()
        loop.call_soon_threadsafe(done.release)
        done.acquire()

    def future() -> None:
        result: concurrent.futures.Future[int] = concurrent.futures.Future()
        loop.call_soon_threadsafe(result.set_result, 1)
        result.result()

    async def noop() -> int:
        return 1

    def coroutine() -> None:
        asyncio.run_coroutine_threadsafe(noop(), loop).result()

    out = {"lock": lock, "future": future, "coroutine": coroutine}
    try:  # not a firetitan dependency; tinker and fireworks-ai bring it in through httpx
        from anyio.from_thread import start_blocking_portal
    except ImportError:
        return out
    # Left open for the process's life (the worker's): a portal per round would measure
    # thread start-ups. The context manager is kept, since collecting it stops the portal.
    _KEEP.append(context := start_blocking_portal())
    portal = context.__enter__()

    def anyio() -> None:
        portal.call(noop)

    return {**out, "anyio": anyio}


# --------------------------------------------------------------------------- B6: torch


def sft_arrays() -> Arrays:
    return batch_arrays(B6_DATUMS, B6_TOKENS, seed=6, vocab=B6_VOCAB)


class TorchSdkPeer:
    """B6: SFT steps (``forward_backward`` + ``optim_step``) through firetitan's async
    core against the torch engine in the trainer process."""

    is_async = True

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.batch = tinker_batch(sft_arrays())

    async def setup(self) -> None:
        import tinker

        from firetitan import AsyncFiretitanServiceClient

        self.adam = tinker.AdamParams(learning_rate=1e-4)
        self.service = AsyncFiretitanServiceClient(base_url=self.url, api_key=self.key)
        await self.service.__aenter__()
        self.tc = await self.service.create_training_client(BASE_MODEL, lora_rank=0)
        await self.step()

    async def close(self) -> None:
        await self.service.aclose()

    async def step(self) -> None:
        fb = self.tc.forward_backward(self.batch, LOSS)
        opt = self.tc.optim_step(self.adam)
        await fb
        await opt

    async def b6(self, steps: int) -> dict[str, Any]:
        return await measure_calls_async(self.step, steps)


class TorchPlainPeer:
    """B6: the same SFT steps in a plain PyTorch loop in this process: the same
    stand-in model (architecture and seeded weights), log-softmax cross-entropy on the
    same tokens and weights, and ``torch.optim.AdamW`` with the same hyperparameters."""

    is_async = False

    def __init__(self, url: str, key: str) -> None:
        del url, key

    def setup(self) -> None:
        import torch

        from firetitan.local.torch.models import build_standin, clone_trainable

        arrays = sft_arrays()
        self.tokens = torch.from_numpy(np.stack([a[0] for a in arrays]))
        self.targets = torch.from_numpy(np.stack([a[1] for a in arrays]))
        self.weights = torch.from_numpy(np.stack([a[2] for a in arrays]))
        # The trainer's engine builds its stand-in with seed 0 and this size.
        # Left in eval mode, as the engine runs it (no dropout either way).
        self.model = clone_trainable(build_standin(BASE_MODEL, "small", 0))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, foreach=True
        )
        self.step()

    def close(self) -> None:
        pass

    def step(self) -> None:
        import torch

        logits = self.model(input_ids=self.tokens, use_cache=False).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        loss = -(picked * self.weights).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        # What the SDK's caller gets back: the loss and per-token logprobs on the CPU.
        float(loss.detach())
        picked.detach().numpy()

    def b6(self, steps: int) -> dict[str, Any]:
        return measure_calls(self.step, steps)


# --------------------------------------------------------------------------- RL step profile


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of another process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The parts of the client the RL profile reports, by the file names cProfile gives the
#: functions; checked in order (the demo lives inside the firetitan package). A C
#: function counts where its main caller is.
_CLIENT_PARTS = (
    ("the demo's own step (datums, rewards, advantages)",
     ("/firetitan/demo/", "/numpy/", "/tinker/")),
    ("firetitan SDK (validation, encoding, decoding, futures)", ("/firetitan/",)),
    ("HTTP and event loop (aiohttp, asyncio)",
     ("/aiohttp/", "/asyncio/", "/yarl/", "/multidict/", "selectors.py", "socket.py")),
)  # fmt: skip
_OTHER_PART = "other"


class RlStepPeer:
    """The demo's RL step (`firetitan.demo.loop`) against a torch-engine trainer in
    another process: step wall time, the sampling phase, the client's and the trainer's
    CPU, and the client's event-loop turns; one more step under cProfile splits the
    client's CPU into SDK, I/O stack and the demo's own work."""

    is_async = True

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.trainer_pid = int(os.environ["FIRETITAN_BENCH_TRAINER_PID"])
        self.turns = 0

    async def setup(self) -> None:
        from firetitan.demo import loop
        from firetitan.demo.config import DemoConfig

        self.loop_module = loop
        self.cfg = DemoConfig(progress=False)
        self.policy = loop._Policy(loop._service(self.url, self.key))
        await self.policy.start(self.cfg.base_model)
        self.ref_service = loop._service(self.url, self.key)
        await self.ref_service.__aenter__()
        self.reference = await self.ref_service.create_training_client(
            self.cfg.base_model, lora_rank=0
        )
        await self.policy.publish("rl-000", self.cfg.rebase_every)
        self._count_loop_turns()
        self.step = 0
        await self._step()  # warm-up

    def _count_loop_turns(self) -> None:
        running = asyncio.get_running_loop()
        run_once = running._run_once  # type: ignore[attr-defined]

        def counted() -> None:
            self.turns += 1
            run_once()

        running._run_once = counted  # type: ignore[attr-defined]

    async def _step(self) -> dict[str, Any]:
        row: dict[str, Any] = await self.loop_module._rl_step(
            self.policy, self.reference, self.cfg, self.step
        )
        self.step += 1
        return row

    async def close(self) -> None:
        await self.ref_service.aclose()
        await self.policy.aclose()

    async def rl(self, steps: int) -> dict[str, Any]:
        out = []
        for _ in range(steps):
            turns, trainer0 = self.turns, _process_cpu(self.trainer_pid)
            c0, t0 = cpu_seconds(), time.perf_counter()
            row = await self._step()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            rate = row["tokens_per_s"]
            sample = row["sampled_tokens"] / rate if rate else float("nan")
            out.append({
                "wall": wall, "client_cpu": cpu, "sample_wall": sample,
                "train_wall": wall - sample,
                "trainer_cpu": _process_cpu(self.trainer_pid) - trainer0,
                "loop_turns": self.turns - turns,
            })  # fmt: skip
        cfg = self.cfg
        config = (
            f"{len(self.loop_module.task.DIGITS)} prompts × {cfg.group_size} samples of up to "
            f"{cfg.max_tokens} tokens, reference `forward`, {cfg.substeps} `ppo` "
            "`forward_backward` + `optim_step` passes, a sampler export"
        )
        return {"steps": out, "profile": await self._profile(), "config": config}

    async def _profile(self) -> dict[str, float]:
        """Fractions of the client's profiled CPU time per part (`_CLIENT_PARTS`)."""
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        await self._step()
        profiler.disable()
        stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        totals = dict.fromkeys([*(name for name, _ in _CLIENT_PARTS), _OTHER_PART], 0.0)
        everything = 0.0
        for (filename, _line, function), (_cc, _nc, tottime, _ct, callers) in stats.items():
            if "poll' of 'select" in function:
                continue  # idle: waiting for the trainer
            everything += tottime
            if filename == "~" and callers:
                # A C function (builtin, method): counted where its main caller is.
                filename = max(callers.items(), key=lambda item: item[1][3])[0][0]
            part = next(
                (name for name, marks in _CLIENT_PARTS if any(m in filename for m in marks)),
                _OTHER_PART,
            )
            totals[part] += tottime
        return {name: value / everything for name, value in totals.items() if everything}
