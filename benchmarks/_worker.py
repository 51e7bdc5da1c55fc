"""One peer's client process: ``python -m benchmarks._worker <peer>``.

The parent (``benchmarks/__main__.py``) starts one worker per peer, so that peers never
share an interpreter: their CPU time, memory and background threads (the Fireworks SDK
and tinker run their own event-loop threads) are measured alone. The trainer's address
and key come in the environment (``FIRETITAN_BENCH_URL``, ``FIRETITAN_BENCH_KEY``).

Protocol: the worker sets up (a session and a model), then reads one JSON command per
line on stdin (``{"op": "B1", "calls": 50}``) and answers each with one line on stdout
starting with `RESULT_PREFIX`. Other output, from libraries, goes to stderr. Between
commands the worker keeps its client, connections and event loop, so the parent can
interleave short rounds of every peer (ABAB...) without paying start-up again.

``--no-torch`` makes ``import torch`` fail in this process, as on a client-only install
(neither firetitan's, tinker's nor fireworks-ai's client dependencies include torch;
tinker and fireworks-ai import it when it is installed). B5 measures memory that way.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from benchmarks._common import RESULT_PREFIX, jsonable, rss_mb

__all__ = ["main"]

Command = dict[str, Any]
Answer = dict[str, Any]


def _answer(obj: Answer) -> None:
    sys.__stdout__.write(RESULT_PREFIX + json.dumps(jsonable(obj)) + "\n")
    sys.__stdout__.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.no_torch:
        # A None entry makes every later `import torch` raise ImportError, which is what
        # tinker's and fireworks-ai's optional torch imports expect when it is absent.
        sys.modules["torch"] = None  # type: ignore[assignment]
    # Libraries that print to stdout must not corrupt the answer lines.
    sys.stdout = sys.stderr

    from benchmarks import _peers

    url = os.environ["FIRETITAN_BENCH_URL"]
    key = os.environ["FIRETITAN_BENCH_KEY"]
    try:
        peer = _peers.make(args.peer, url, key)
        started = time.perf_counter()
        runner = _Runner(peer.is_async)
        runner.run(peer.setup)
        # Every peer starts measuring with a clean heap: otherwise whoever allocates
        # first pays the full collection that imports and set-up have made due.
        gc.collect()
        _answer({"ok": True, "setup_s": time.perf_counter() - started, **rss_mb()})
    except Exception as exc:
        traceback.print_exc()
        _answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1

    code = 0
    for line in sys.stdin:
        command: Command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            method = getattr(peer, op.lower())
            result = runner.run(lambda m=method, c=command: m(**c))
            _answer({"ok": True, **result})
        except Exception as exc:
            traceback.print_exc()
            _answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            code = 1
    try:
        runner.run(peer.close)
    finally:
        runner.close()
    return code


class _Runner:
    """Runs a peer's methods: on one persistent event loop for async peers, so that its
    connections and background tasks live across commands; directly for sync ones."""

    def __init__(self, is_async: bool) -> None:
        self._runner = asyncio.Runner() if is_async else None

    def run(self, fn: Callable[[], Any]) -> Any:
        if self._runner is None:
            return fn()
        coro: Coroutine[Any, Any, Any] = fn()
        return self._runner.run(coro)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()


if __name__ == "__main__":
    sys.exit(main())
