"""Load: 32 concurrent clients, each keeping 8 futures in flight, against one trainer.

The trainer is a ``firetitan serve`` child process, so that its memory is measured apart
from the clients'. It runs once on the null engine (the protocol, queues and futures are
what is loaded, not a model) and once on the torch engine (the tiny stand-in, trained on
the CPU: every call does real compute, one at a time). Each client trains a LoRA model.
Every call must succeed; the figures are throughput, p50/p99 latency from call to
resolved future, and resident memory of the trainer and of the client process over
time, which must stay flat once warmed up.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from shared import BASE_MODEL, connect

from firetitan import (
    AsyncAPIFuture,
    AsyncFiretitanTrainingClient,
    ClientConfig,
    RetryPolicy,
)
from firetitan.local import LocalTrainer

from .common import ADAM, HAS_PROC, local_model, percentile, rss_mib, serve, sft_batch
from .conftest import Figures, Scale, scales

KEY = "tml-reliability-load-key"
LOAD_CLIENT = ClientConfig(retry=RetryPolicy(deadline=60.0), future_deadline=120.0)
CLIENTS = 32
IN_FLIGHT = 8


class Worker:
    """One client: keeps ``IN_FLIGHT`` calls in flight until told to stop."""

    def __init__(self, tc: AsyncFiretitanTrainingClient) -> None:
        self.tc = tc
        self.slots = asyncio.Semaphore(IN_FLIGHT)
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self.calls = 0

    def _submit(self) -> AsyncAPIFuture[Any]:
        n = self.calls
        self.calls += 1
        kind = n % 3
        if kind == 0:
            return self.tc.forward_backward(sft_batch(n % 50, size=2), "cross_entropy")
        if kind == 1:
            return self.tc.optim_step(ADAM)
        return self.tc.forward(sft_batch(n % 50, size=2), "cross_entropy")

    async def run(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            await self.slots.acquire()
            started = loop.time()
            future = self._submit()

            def done(f: AsyncAPIFuture[Any], started: float = started) -> None:
                self.latencies.append(loop.time() - started)
                if f.cancelled():
                    self.errors.append(asyncio.CancelledError())
                elif f.exception() is not None:
                    self.errors.append(f.exception())  # type: ignore[arg-type]
                self.slots.release()

            future.add_done_callback(done)
        # Drain: every call made is waited for.
        async with asyncio.timeout(120):
            for _ in range(IN_FLIGHT):
                await self.slots.acquire()


async def sample_memory(pid: int, samples: list[tuple[float, float, float]]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        samples.append((loop.time() - start, rss_mib(pid), rss_mib()))
        await asyncio.sleep(0.25)


def _flat(series: list[float]) -> tuple[float, float]:
    """(after warm-up, at the end): medians of the second quarter and the last quarter
    of a series."""
    q = max(1, len(series) // 4)
    warm = sorted(series[q : 2 * q])[len(series[q : 2 * q]) // 2]
    end = sorted(series[-q:])[len(series[-q:]) // 2]
    return warm, end


ENGINE_ARGS = {"null": ("--engine", "null"), "torch": ("--engine", "torch", "--device", "cpu")}


@pytest.mark.asyncio
@pytest.mark.skipif(not HAS_PROC, reason="reads process memory from /proc (Linux)")
@pytest.mark.parametrize("engine", sorted(ENGINE_ARGS))
@pytest.mark.parametrize(
    "scale", scales(short={"seconds": 4.0}, long={"seconds": 30.0}, long_timeout=300)
)
async def test_32_clients_with_8_futures_in_flight(
    scale: Scale, engine: str, tmp_path: Path, figures: Figures
) -> None:
    args = (*ENGINE_ARGS[engine], "--api-key", KEY, "--checkpoint-dir", str(tmp_path))
    async with serve(*args) as child, contextlib.AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(
                connect(child.base_url, KEY, LOAD_CLIENT)
            )
            for _ in range(CLIENTS)
        ]
        tcs = await asyncio.gather(
            *(s.create_lora_training_client(BASE_MODEL, rank=8) for s in services)
        )
        workers = [Worker(tc) for tc in tcs]
        samples: list[tuple[float, float, float]] = []
        sampler = asyncio.ensure_future(sample_memory(child.pid, samples))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.gather(*(w.run(started + scale.seconds) for w in workers))
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        elapsed = loop.time() - started
    errors = [e for w in workers for e in w.errors]
    assert not errors, errors[:5]
    latencies = [x for w in workers for x in w.latencies]
    calls = sum(w.calls for w in workers)
    assert len(latencies) == calls
    server = [s[1] for s in samples]
    client = [s[2] for s in samples]
    server_warm, server_end = _flat(server)
    client_warm, client_end = _flat(client)
    # Flat: once warmed up, neither process keeps growing. The allowance covers the
    # allocator's noise and the trainer's bounded result cache filling up.
    assert server_end <= server_warm * 1.15 + 16, (server_warm, server_end)
    assert client_end <= client_warm * 1.15 + 16, (client_warm, client_end)
    figures.record(
        f"load ({scale.name})",
        engine=engine,
        clients=CLIENTS,
        in_flight_per_client=IN_FLIGHT,
        seconds=round(elapsed, 1),
        calls=calls,
        errors=0,
        calls_per_s=calls / elapsed,
        p50_ms=1e3 * percentile(latencies, 50),
        p99_ms=1e3 * percentile(latencies, 99),
        max_ms=1e3 * max(latencies),
        server_rss_mib={"warm": server_warm, "end": server_end, "max": max(server)},
        client_rss_mib={"warm": client_warm, "end": client_end, "max": max(client)},
        samples=len(samples),
    )
    print(
        "rss samples (s, server MiB, client MiB):",
        [(round(t, 1), round(a), round(b)) for t, a, b in samples[:: max(1, len(samples) // 12)]],
    )


@pytest.mark.asyncio
async def test_the_in_memory_execution_log_is_bounded(tmp_path: Path) -> None:
    """A trainer that runs for days keeps a bounded execution log in memory; the JSONL
    file keeps every entry."""
    path = tmp_path / "executed.jsonl"
    async with (
        LocalTrainer("null", max_execution_log_entries=5, execution_log_path=path) as trainer,
        local_model(trainer, LOAD_CLIENT) as tc,
    ):
        for step in range(6):
            await tc.forward_backward(sft_batch(step, size=1), "cross_entropy")
            await tc.optim_step(ADAM)
        log = trainer.execution_log
    assert [r.seq_id for r in log] == [8, 9, 10, 11, 12]
    assert len((await asyncio.to_thread(path.read_text)).splitlines()) == 13  # with the create
