"""The programs in examples/ run, in their short form, exactly as a user would run them.

Each runs as a subprocess on the torch engine (`--quick`), so the examples are
documentation that cannot rot: an API change that breaks one fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *options: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *options],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_example_is_tested() -> None:
    tested = {"async_grpo.py", "sft_resume.py", "two_trainers.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("where", ["trainer", "deployment"])
def test_async_grpo(where: str) -> None:
    # Sampling on the trainer, or on a local deployment that hot-loads every export.
    out = run_example("async_grpo.py", *(["--deployment"] if where == "deployment" else []))
    assert f"sampling on the {where}\n" in out
    steps = re.findall(r"^step (\d+): mean reward ([\d.]+), loss:sum (-?[\d.]+)$", out, re.M)
    assert [s[0] for s in steps] == ["0", "1"]
    assert all(0.0 <= float(reward) <= 1.0 for _, reward, _ in steps)
    assert "mean reward: first steps" in out


def test_sft_resume() -> None:
    out = run_example("sft_resume.py")
    losses = [float(x) for x in re.findall(r"^sft step \d+: loss ([\d.]+)", out, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "(base)" in out and "(delta)" in out
    assert "job 1 checkpoints: ['sft-step-2', 'sft-step-4']" in out
    resumed = re.search(
        r"job 2 resumed cross_job://sft-job-1/sft-step-4: loss ([\d.]+) "
        r"\(job 1 measured ([\d.]+)\)",
        out,
    )
    assert resumed is not None and resumed.group(1) == resumed.group(2)
    assert re.search(r"^sample: 'the ", out, re.M)


def test_two_trainers() -> None:
    out = run_example("two_trainers.py")
    steps = re.findall(r"^step \d+: slow ([\d.]+), fast ([\d.]+)$", out, re.M)
    assert len(steps) == 3
    # Same seed, same data: both start from the same loss; the larger step size moves more.
    assert steps[0][0] == steps[0][1]
    assert float(steps[-1][1]) < float(steps[-1][0])
    assert out.count("held-out loss of") == 2
