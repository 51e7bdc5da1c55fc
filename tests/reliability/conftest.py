"""Scales and figures of the reliability suite.

* `scales` turns a short and a long parameter set into two pytest params: ``short`` runs
  in the normal CI run, ``long`` carries the ``reliability`` marker (``nox -s
  reliability``) and a longer timeout.
* The `figures` fixture records what a test measured (faults injected, requests checked,
  fuzz cases, latency, memory). Each record is printed as one line with ``-s`` and all
  of them are listed in a "reliability figures" section of the terminal summary;
  ``FIRETITAN_RELIABILITY_FIGURES=<path>`` also writes them to a JSON file, and
  ``FIRETITAN_RELIABILITY_RESULTS=<path>`` to a Markdown report stamped with the commit
  measured and the machine (``nox -s reliability`` writes `RESULTS.md` beside this file).
  Every record names the engine its trainer ran (``torch`` or ``null``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

_FIGURES = pytest.StashKey[list[dict[str, Any]]]()


class Scale:
    """The sizes one test runs at: attribute access to the parameters given."""

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self.name = name
        self._values = dict(values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return f"Scale({self.name})"


def scales(short: dict[str, Any], long: dict[str, Any], *, long_timeout: float = 600) -> Any:
    """``@pytest.mark.parametrize("scale", scales(...))`` for a short and a long size."""
    return [
        pytest.param(Scale("short", short), id="short"),
        pytest.param(
            Scale("long", long),
            id="long",
            marks=[pytest.mark.reliability, pytest.mark.timeout(long_timeout)],
        ),
    ]


class Figures:
    """What one test measured; see the module docstring."""

    def __init__(self, test: str, sink: list[dict[str, Any]]) -> None:
        self._test = test
        self._sink = sink

    def record(self, topic: str, *, engine: str, **values: Any) -> None:
        """Record (and print) one line of figures under ``topic``, measured on a trainer
        running ``engine``."""
        entry = {"test": self._test, "topic": topic, "engine": engine, **values}
        self._sink.append(entry)
        print(f"[figures] {topic} ({engine} engine): {_format(values)}")


def _format(values: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in sorted(value.items())) + "}"
        return str(value)

    return ", ".join(f"{key}={one(value)}" for key, value in values.items())


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    sink = request.config.stash.setdefault(_FIGURES, [])
    return Figures(request.node.name, sink)


_STAMP = pytest.StashKey[dict[str, str]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    # The code measured is the code this run loaded: stamp it now, not when the run ends
    # (the checkout may have moved on by then).
    if os.environ.get("FIRETITAN_RELIABILITY_RESULTS"):
        session.config.stash[_STAMP] = _stamp(Path(os.environ["FIRETITAN_RELIABILITY_RESULTS"]))


def _stamp(report: Path) -> dict[str, str]:
    from benchmarks._report import commit_measured, machine_details

    root = Path(__file__).resolve().parents[2]
    try:
        name = report.resolve().relative_to(root).as_posix()
    except ValueError:
        name = report.name
    return {
        "commit measured": commit_measured(root, report=name),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **machine_details(),
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_FIGURES, [])
    if not rows:
        return
    terminalreporter.section("reliability figures")
    for row in rows:
        terminalreporter.write_line(
            f"{row['topic']} [{row['test']}, {row['engine']} engine]: {_format(_values(row))}"
        )
    target = os.environ.get("FIRETITAN_RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    report = os.environ.get("FIRETITAN_RELIABILITY_RESULTS")
    if report:
        args = " ".join(config.invocation_params.args)
        stamp = config.stash.get(_STAMP, None) or _stamp(Path(report))
        markdown = _markdown(rows, stamp, f"pytest {args}", exitstatus)
        Path(report).write_text(markdown, encoding="utf-8")


def _values(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("test", "topic", "engine")}


def _markdown(
    rows: list[dict[str, Any]], stamp: dict[str, str], command: str, exitstatus: int
) -> str:
    """The figures as a Markdown report, stamped with what they measured."""
    facts = {
        **stamp,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"`{command}`",
        "outcome": "all tests passed" if exitstatus == 0 else f"pytest exit status {exitstatus}",
    }
    lines = [
        "# Reliability figures",
        "",
        "Written by `nox -s reliability` (the long forms of `tests/reliability/`; any "
        "pytest run with `FIRETITAN_RELIABILITY_RESULTS` set writes it the same way); do "
        "not edit by hand. Each line is one test's figures, on a trainer running the engine "
        "named: `torch` trains the tiny stand-in model on the CPU, `null` serves the "
        "protocol with no model compute.",
        "",
        *(f"- {key}: {value}" for key, value in facts.items()),
        "",
        "| figures | test | engine | values |",
        "|---|---|---|---|",
    ]
    for row in rows:
        values = _format(_values(row)).replace("|", "\\|")
        lines.append(f"| {row['topic']} | `{row['test']}` | {row['engine']} | {values} |")
    return "\n".join(lines) + "\n"
