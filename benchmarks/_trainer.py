"""The local trainer under test, as a separate process (``firetitan serve``).

A separate process, not `firetitan.local.LocalTrainer` in a thread: a trainer sharing
the client's interpreter would share its GIL, and the client's figures (latency, CPU)
would include the trainer's work.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from firetitan.local import generate_api_key

__all__ = ["Trainer", "serve"]

_SERVING = re.compile(r"serving at (http://\S+)")


@attrs.frozen
class Trainer:
    """A running trainer: where it listens and the key it expects."""

    base_url: str
    api_key: str
    pid: int
    log: Path


@contextlib.contextmanager
def serve(
    engine: str,
    log_dir: Path,
    *,
    extra: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
) -> Iterator[Trainer]:
    """Run ``firetitan serve --engine <engine> --port 0`` until the block ends.

    The key travels in the environment (argv is readable by other processes). The
    trainer's output (stdout and stderr) is copied to a log file in ``log_dir``; its
    first line with ``serving at <url>`` says it is ready.

    Args:
        engine: ``null`` or ``torch``.
        log_dir: Where the trainer's log goes.
        extra: More ``firetitan serve`` options.
        env: More environment variables for the trainer.
        timeout: Seconds to wait for it to get ready.

    Raises:
        RuntimeError: The trainer exited or did not get ready within ``timeout``.
    """
    key = generate_api_key()
    log = log_dir / f"trainer-{engine}.log"
    env = {**os.environ, **(env or {}), "FIRETITAN_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "firetitan.cli", "serve", "--engine", engine, "--port", "0",
        *extra,
    ]  # fmt: skip
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            # Keep draining stdout for the trainer's whole life, so it never blocks on a
            # full pipe; everything also goes to the log.
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name=f"trainer-{engine}-stdout", daemon=True).start()
        try:
            url = _wait_ready(lines, timeout, log)
            yield Trainer(base_url=url, api_key=key, pid=proc.pid, log=log)
        finally:
            proc.terminate()  # SIGTERM: the trainer finishes in-flight work and exits
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(lines: queue.Queue[str | None], timeout: float, log: Path) -> str:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"the trainer did not start within {timeout:.0f} s; see {log}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"the trainer exited during start-up; see {log}")
        match = _SERVING.search(line)
        if match:
            return match.group(1)
