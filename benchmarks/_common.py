"""What every benchmark process shares: workload shapes, batches, and measurements.

The workloads are defined once here so that every peer does exactly the same work:
the same token ids, the same ``loss_fn_inputs``, the same number of calls. Each peer
builds them with its own types (tinker's for firetitan and tinker, the Fireworks SDK's
own for fireworks-ai, pre-encoded bytes for the raw floor).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "B1_TOKENS",
    "B3_DATUMS",
    "B3_TOKENS",
    "B6_DATUMS",
    "B6_TOKENS",
    "B6_VOCAB",
    "BASE_MODEL",
    "RESULT_PREFIX",
    "Arrays",
    "Lists",
    "batch_arrays",
    "batch_lists",
    "cpu_seconds",
    "jsonable",
    "measure_calls",
    "measure_calls_async",
    "rss_mb",
]

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"

#: B1/B2/B4/B5: one datum of 32 tokens.
B1_TOKENS = 32
#: B3: 32 datums of 2048 tokens.
B3_DATUMS = 32
B3_TOKENS = 2048
#: B6: an SFT batch on the ``small`` stand-in (byte-level vocabulary).
B6_DATUMS = 4
B6_TOKENS = 64
B6_VOCAB = 256

#: Worker answers are the lines of its stdout that start with this; anything else a
#: library prints there is ignored.
RESULT_PREFIX = "@@bench "

# Null-engine vocabulary is 512; ids stay well inside it, and inside the stand-in's.
_MAX_TOKEN = 250


Arrays = list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]]


def batch_arrays(datums: int, tokens: int, *, seed: int = 0, vocab: int = _MAX_TOKEN) -> Arrays:
    """``(model input, target tokens, weights)`` per datum, deterministic.

    The weights mask the first quarter of each sequence (a prompt) with zeros, as SFT
    batches do, so the float tensor is realistic rather than all ones.
    """
    rng = np.random.default_rng(seed)
    out: Arrays = []
    for _ in range(datums):
        seq = rng.integers(1, vocab, size=tokens + 1, dtype=np.int64)
        weights = np.ones(tokens, dtype=np.float32)
        weights[: tokens // 4] = 0.0
        out.append((seq[:-1], seq[1:], weights))
    return out


Lists = list[tuple[list[int], list[int], list[float]]]


def batch_lists(datums: int, tokens: int, *, seed: int = 0) -> Lists:
    """`batch_arrays` as plain Python lists, the way a training loop usually has its
    data (token ids from a tokenizer, weights from a mask)."""
    return [
        (tokens_.tolist(), targets.tolist(), weights.tolist())
        for tokens_, targets, weights in batch_arrays(datums, tokens, seed=seed)
    ]


def rss_mb() -> dict[str, float]:
    """This process's current and peak resident memory, in MiB.

    Reads ``/proc/self/status`` (VmRSS, VmHWM) where it exists; elsewhere only the peak
    from ``getrusage`` is known.
    """
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out["rss" if name == "VmRSS" else "peak"] = int(value.split()[0]) / 1024
    except OSError:
        pass
    if "peak" not in out:
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        scale = 1024 * 1024 if os.uname().sysname == "Darwin" else 1024
        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    return out


def cpu_seconds() -> float:
    """CPU time of this whole process (every thread, user + system)."""
    return time.process_time()


def jsonable(value: Any) -> Any:
    """Floats rounded for the result lines (nanosecond resolution is noise)."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def measure_calls(call: Callable[[], None], calls: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of ``calls`` sequential calls of a blocking ``call``."""
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(calls):
        c0, t0 = cpu_seconds(), time.perf_counter()
        call()
        t1, c1 = time.perf_counter(), cpu_seconds()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {"wall": wall, "cpu": cpu}


async def measure_calls_async(
    call: Callable[[], Coroutine[Any, Any, Any]], calls: int
) -> dict[str, list[float]]:
    """Wall and CPU seconds of ``calls`` sequential awaits of ``call()``."""
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(calls):
        c0, t0 = cpu_seconds(), time.perf_counter()
        await call()
        t1, c1 = time.perf_counter(), cpu_seconds()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {"wall": wall, "cpu": cpu}
