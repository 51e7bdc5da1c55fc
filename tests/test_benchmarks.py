"""The benchmark harness still runs: its quickest mode, one benchmark, two peers.

It checks that a report with the table comes out, never what the figures are (tests
never time anything).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_report(tmp_path: Path, *args: str, timeout: float) -> str:
    """Run ``python -m benchmarks --quick <args>``; the report it wrote."""
    report = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "--quick", *args,
            "--output", str(report), "--log-dir", str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return report.read_text(encoding="utf-8")


def test_quick_b1_writes_a_table(tmp_path: Path) -> None:
    peers = ("--peers", "floor,firetitan-async", "--rounds", "1")
    text = quick_report(tmp_path, "--only", "B1", *peers, timeout=100)
    assert "## B1 latency" in text
    rows = [line for line in text.splitlines() if line.startswith("| raw aiohttp floor |")]
    assert rows, text
    assert any(line.startswith("| firetitan async |") for line in text.splitlines())
    assert "## Targets" in text and "B1 firetitan async × raw aiohttp floor" in text
    assert "could not run" not in text  # both peers ran
    # Stamped with the commit it measured and the machine; targets carry their spread.
    assert "* commit measured: " in text and "* CPU: " in text
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert head in text
    assert "| target | median | spread over rounds | goal | status |" in text


def test_rl_step_profile_writes_its_section(tmp_path: Path) -> None:
    text = quick_report(tmp_path, "--only", "RL", timeout=300)
    assert "could not run" not in text, text
    assert "## RL step profile" in text
    rows = {line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if "|" in line}
    for row in ("step wall time", "trainer process CPU (engine, sampler, HTTP)",
                "client event-loop turns per step"):  # fmt: skip
        assert row in rows, text
    assert any(r.startswith("of which firetitan SDK") for r in rows), text
    assert "| RL step: client CPU share of the step |" in text
