"""Per-call cost of a blocking call through firetitan's portal and through anyio's.

The facade runs the async core on one loop thread; each blocking call is two thread
hops. anyio's `BlockingPortal` does the same job; this measures both on the same no-op
coroutine, rounds interleaved, and prints the medians (the README's development notes
cite the ratio to explain why firetitan keeps its own portal). It also times the
facade's own hop, `start(...).result()` on a call whose async future is already
resolved, to set beside the bare hand-offs of benchmark B4 (the portal is internal, so
the benchmarks, which use the public API only, leave it out).

    PYTHONPATH=$PWD python scripts/measure_portal.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.from_thread

from firetitan._async.async_future import AsyncAPIFuture
from firetitan._portal import get_portal

CALLS = 3000
ROUNDS = 5


async def _noop(value: int) -> int:
    return value


def _per_call_us(call: Callable[[Callable[[int], Awaitable[int]], int], Any]) -> float:
    for _ in range(200):
        call(_noop, 1)
    start = time.perf_counter()
    for _ in range(CALLS):
        call(_noop, 1)
    return (time.perf_counter() - start) / CALLS * 1e6


def _resolved(value: int) -> AsyncAPIFuture[int]:
    future: AsyncAPIFuture[int] = AsyncAPIFuture(kind="noop", deadline=None)
    future._set_result(value)
    return future


def main() -> None:
    portal = get_portal()
    rounds: dict[str, list[float]] = {"firetitan": [], "anyio": [], "facade hop": []}
    with anyio.from_thread.start_blocking_portal() as other:
        for _ in range(ROUNDS):
            rounds["firetitan"].append(_per_call_us(portal.call))
            rounds["anyio"].append(_per_call_us(other.call))
            rounds["facade hop"].append(
                _per_call_us(lambda _fn, value: portal.start(_resolved, value).result())
            )
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    for name, values in rounds.items():
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name:10s} {medians[name]:6.1f} us per blocking call (rounds {spread})")
    print(f"anyio / firetitan: {medians['anyio'] / medians['firetitan']:.2f}x")


if __name__ == "__main__":
    main()
