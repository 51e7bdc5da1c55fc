"""Shared pieces of the reliability suite: SFT data, weight read-back, trainer child
processes, memory and latency figures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tinker
from shared import BASE_MODEL, connect

from firetitan import (
    AsyncFiretitanTrainingClient,
    ClientConfig,
    RetryPolicy,
    Timeouts,
)
from firetitan.local import ExecutionRecord, LocalTrainer

ADAM = tinker.AdamParams(learning_rate=2e-3, grad_clip_norm=1.0)
HOOKED_SERVE = Path(__file__).with_name("hooked_serve.py")
#: Memory and sockets are read from /proc (Linux); psutil is not a dependency.
HAS_PROC = Path("/proc/self/status").exists()

# A client that gives up on an unreachable trainer within seconds, so that a test of a
# dead trainer sees the error instead of five minutes of retries. (Long-polls keep the
# default read timeout: ``firetitan serve`` holds a poll for 25 s.)
IMPATIENT_CLIENT = ClientConfig(
    timeouts=Timeouts(connect=1.0, request=10.0),
    retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5, deadline=2.0, max_retry_after=0.5),
    future_deadline=120.0,
    heartbeat_interval=0.5,
)


def sft_datum(step: int, index: int, length: int = 12) -> tinker.Datum:
    """One next-token-prediction datum, a pure function of ``(step, index)``."""
    rng = np.random.default_rng([step, index])
    tokens = rng.integers(1, 250, length + 1)  # inside every engine's vocabulary
    weights = np.ones(length, dtype=np.float32)
    weights[: length // 3] = 0.0  # a prompt part that is not trained on
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64), "weights": weights},
    )


def sft_batch(step: int, size: int = 4) -> list[tinker.Datum]:
    return [sft_datum(step, i) for i in range(size)]


async def sft_steps(
    tc: AsyncFiretitanTrainingClient, steps: Sequence[int], *, window: int = 5
) -> list[Any]:
    """Run ``forward_backward`` + ``optim_step`` for each step, ``window`` steps pipelined
    at a time; return the metrics of every call, in order."""
    metrics: list[Any] = []
    steps = list(steps)
    for start in range(0, len(steps), window):
        futures = []
        for step in steps[start : start + window]:
            futures.append(tc.forward_backward(sft_batch(step), "cross_entropy"))
            futures.append(tc.optim_step(ADAM))
        for future in futures:
            metrics.append((await future).metrics)
    return metrics


async def export_weights(tc: AsyncFiretitanTrainingClient, root: Path, job_id: str) -> bytes:
    """Export the model's full weights (``base``) and return the safetensors bytes."""
    result = await tc.save_weights_for_sampler_ext("weights", checkpoint_type="base")
    path = root / job_id / "sampler" / result.snapshot_name / "model.safetensors"
    return await asyncio.to_thread(path.read_bytes)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def ordered_log(log: Sequence[ExecutionRecord], model_id: str) -> list[tuple[int | None, str]]:
    """``(seq_id, kind)`` of a model's ordered requests, in execution order."""
    return [
        (r.seq_id, r.kind)
        for r in log
        if r.model_id == model_id and r.seq_id is not None and r.seq_id > 0
    ]


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (``VmRSS``), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None, status
    return int(match.group(1)) / 1024


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


class Child:
    """A trainer child process (``firetitan serve``) and everything it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.base_url = ""
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = asyncio.Condition()
        self._readers = [
            asyncio.ensure_future(self._drain(proc.stdout, self.stdout)),
            asyncio.ensure_future(self._drain(proc.stderr, self.stderr)),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    async def _drain(self, stream: asyncio.StreamReader | None, sink: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            async with self._changed:
                sink.append(line.decode("utf-8", "replace"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self, pattern: str, within: float = 60.0, *, stderr: bool = False
    ) -> re.Match[str]:
        """The first line of stdout (or stderr) matching ``pattern``, waiting up to
        ``within`` s for it."""
        regex = re.compile(pattern)
        lines = self.stderr if stderr else self.stdout

        def found() -> re.Match[str] | None:
            for line in lines:
                match = regex.search(line)
                if match:
                    return match
            return None

        async with asyncio.timeout(within), self._changed:
            while (match := found()) is None:
                if self.proc.returncode is not None and all(r.done() for r in self._readers):
                    raise AssertionError(f"child exited before {pattern!r}:\n{self.output}")
                await self._changed.wait()
        return match

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the child."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the graceful stop."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, within: float = 60.0) -> int:
        """The exit code, once the child has exited (waiting up to ``within`` s)."""
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code


@contextlib.asynccontextmanager
async def serve(
    *args: str, hooked: bool = False, env: dict[str, str] | None = None, within: float = 90.0
) -> AsyncIterator[Child]:
    """Run ``firetitan serve <args>`` (or the hooked variant, `hooked_serve.py`) until it
    prints its URL; kill it on the way out if it is still running."""
    program = [str(HOOKED_SERVE)] if hooked else ["-m", "firetitan.cli"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *program,
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    child = Child(proc)
    try:
        match = await child.wait_for(r"serving at (http://\S+)", within)
        child.base_url = match.group(1)
        yield child
    finally:
        child.kill()
        await child.wait()


@contextlib.asynccontextmanager
async def served_model(
    *args: str, key: str, hooked: bool = False, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Child, AsyncFiretitanTrainingClient]]:
    """`serve` a trainer (``args`` name ``--api-key key``) and open a model on it
    through an `IMPATIENT_CLIENT`."""
    async with (
        serve(*args, hooked=hooked, env=env) as child,
        connect(child.base_url, key, IMPATIENT_CLIENT) as service,
    ):
        yield child, await service.create_training_client(BASE_MODEL)


@contextlib.asynccontextmanager
async def local_model(
    trainer: LocalTrainer, config: ClientConfig = IMPATIENT_CLIENT, **model: Any
) -> AsyncIterator[AsyncFiretitanTrainingClient]:
    """A model on an in-process ``trainer`` (``model``: `create_training_client`'s
    options), its service client closed on exit."""
    async with connect(trainer.base_url, trainer.api_key, config) as service:
        yield await service.create_training_client(BASE_MODEL, **model)
