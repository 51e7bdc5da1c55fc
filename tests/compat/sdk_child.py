"""Running a public SDK's flow in a child process against a trainer in the test process.

Why a child process: both public SDKs (fireworks-ai and tinker) run their network work
on a process-wide daemon event-loop thread that they start on first use and never
stop, so in the test process it would outlive the test. In a child it dies with the
process. The trainer stays in the test process, so tests can read its execution log
and checkpoint store.

Parent side: `run_flow` (or `child_environment` for a child started otherwise). Child
side (a module run with ``python -m``): `trainer_address` for where to connect,
`SdkProblems` to collect what the SDK logs, `report` for the answer, or `run_child` for
all three. The child runs with warnings as errors, and imports the tests' shared helpers
as the tests do (``from shared import ...``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the child imports this module too, and needs no trainer
    from firetitan.local import LocalTrainer

_URL_VAR = "FIRETITAN_TEST_BASE_URL"
_KEY_VAR = "FIRETITAN_TEST_API_KEY"
_ROOT = Path(__file__).resolve().parents[2]


def child_environment(
    base_url: str, api_key: str, env: dict[str, str] | None = None
) -> dict[str, str]:
    """This process's environment for a child that drives the trainer at ``base_url``,
    plus ``env``; the child finds the repository and ``tests/`` on its import path."""
    path = [str(_ROOT), str(_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        **(env or {}),
        _URL_VAR: base_url,
        _KEY_VAR: api_key,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
    }


def run_flow(
    module: str,
    trainer: LocalTrainer,
    *,
    stdin: str = "",
    timeout: float = 100,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -W error -m <module>`` against ``trainer``; return its report.

    The address and key go through the environment, not argv, which other processes
    can read. ``stdin`` is the child's input (e.g. its data as JSON); ``env`` adds
    variables (e.g. where a deployment is).

    Raises:
        AssertionError: The child failed; the message holds the end of its stderr.
    """
    child_env = child_environment(trainer.base_url, trainer.api_key, env)
    # TINKER_TELEMETRY stays on: the trainer accepts telemetry, and the SDKs' telemetry
    # flush on close is part of what must work without warnings.
    child_env.pop("TINKER_TELEMETRY", None)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", module],
        env=child_env,
        cwd=_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def trainer_address() -> tuple[str, str]:
    """(child) The trainer's base URL and API key."""
    return os.environ[_URL_VAR], os.environ[_KEY_VAR]


class SdkProblems(logging.Handler):
    """(child) Collects every WARNING-or-worse record of the named loggers: with a
    compatible trainer, an SDK has nothing to warn about (retries, validation trouble,
    telemetry failures are protocol problems)."""

    def __init__(self, *loggers: str) -> None:
        super().__init__(level=logging.WARNING)
        self._loggers = frozenset(loggers)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in self._loggers:
            self.problems.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def install(self) -> SdkProblems:
        root = logging.getLogger()
        root.addHandler(self)
        root.setLevel(logging.WARNING)
        return self


def report(summary: dict[str, Any]) -> None:
    """(child) Hand the summary to `run_flow`: one JSON line, last on stdout."""
    print(json.dumps(summary))


def run_child(flow: Callable[[str, str], dict[str, Any]], *loggers: str) -> int:
    """(child) Run ``flow(base_url, api_key)`` and `report` its summary, with every
    WARNING-or-worse record of the SDK's ``loggers`` under ``sdk_problems``."""
    collect = SdkProblems(*loggers).install()
    summary = flow(*trainer_address())
    summary["sdk_problems"] = collect.problems
    report(summary)
    return 0
