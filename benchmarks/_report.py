"""Statistics and the Markdown report (``benchmarks/RESULTS.md``).

Every figure is a median over all samples of all rounds; ratios divide a peer's median
by the floor's and by fireworks-ai's, measured in the same run. Targets are goals for
the report, never assertions: a missed one is marked with how far it is off, and the
hand-written analysis in ``benchmarks/NOTES.md`` (profiles, causes) is appended.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "Report",
    "Target",
    "commit_measured",
    "machine_details",
    "median",
    "quantile",
    "round_ratios",
    "spread",
]

FLOOR = "floor"
FIREWORKS = "fireworks"
PEER_LABELS = {
    "floor": "raw aiohttp floor",
    "firetitan-async": "firetitan async",
    "firetitan-sync": "firetitan sync",
    "firetitan-json": "firetitan async, JSON results",
    "fireworks": "fireworks-ai",
    "tinker": "tinker",
}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def spread(values: Sequence[float]) -> tuple[float, float]:
    """The interquartile range ``(p25, p75)``; NaNs when empty."""
    return quantile(values, 0.25), quantile(values, 0.75)


def fmt_spread(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``p25–p75`` of ``values`` times ``scale``, for a table cell."""
    low, high = spread(values)
    if math.isnan(low):
        return "n/a"
    return f"{low * scale:,.{digits}f}–{high * scale:,.{digits}f}"


def round_ratios(
    samples: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]
) -> list[float]:
    """Per-round ratios of medians: round r's median of ``samples[r]`` divided by round
    r's median of ``reference[r]``. Their spread says how much a ratio moved between
    rounds of one run."""
    return [
        ratio(median(a), median(b)) for a, b in zip(samples, reference, strict=False) if a and b
    ]


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}×"


@attrs.frozen
class Target:
    """One goal: ``figure <= goal`` (or ``<`` when ``strict``).

    ``figure`` is a median (see `of_rounds`); ``rounds`` holds the same figure measured
    in each round alone, whose interquartile range the report prints as the spread.
    """

    name: str
    figure: float
    goal: float
    unit: str
    strict: bool = False
    rounds: tuple[float, ...] = attrs.field(default=(), converter=tuple)
    #: What one entry of ``rounds`` is: a round, or a step (RL), a process (B5).
    per: str = "rounds"

    @classmethod
    def of_rounds(
        cls, name: str, rounds: Sequence[float], goal: float, unit: str, **kwargs: Any
    ) -> Target:
        """A target judged on the median of its per-round figures: each round compares
        the peers under the same conditions, so a load that drifts between rounds moves
        the spread, not the verdict."""
        figure = median([v for v in rounds if not math.isnan(v)])
        return cls(name, figure, goal, unit, rounds=tuple(rounds), **kwargs)

    def spread(self) -> str:
        values = [v for v in self.rounds if not math.isnan(v)]
        if len(values) < 2:
            return "n/a"
        return f"{fmt_spread(values)} {self.unit} ({len(values)} {self.per})"

    @property
    def met(self) -> bool | None:
        if math.isnan(self.figure):
            return None
        return self.figure < self.goal if self.strict else self.figure <= self.goal

    def status(self) -> str:
        met = self.met
        if met is None:
            return "not measured"
        if met:
            return "met"
        over = (self.figure / self.goal - 1.0) * 100.0 if self.goal else math.inf
        return f"**missed** by {over:.0f}%"


@attrs.define
class Report:
    """Sections of Markdown, built as the benchmarks finish."""

    title: str
    header: list[str] = attrs.field(factory=list)
    sections: list[str] = attrs.field(factory=list)
    targets: list[Target] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def table(
        self, heading: str, intro: str, columns: Sequence[str], rows: list[list[str]]
    ) -> None:
        lines = [f"## {heading}", "", intro, ""] if intro else [f"## {heading}", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.sections.append("\n".join(lines))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self, analysis: str | None) -> str:
        parts = [f"# {self.title}", "", *self.header, ""]
        if self.targets:
            rows = [
                f"| {t.name} | {fmt(t.figure)} {t.unit} | {t.spread()} | "
                f"{'<' if t.strict else '≤'} {fmt(t.goal)} {t.unit} | {t.status()} |"
                for t in self.targets
            ]
            parts += [
                "## Targets",
                "",
                "Each target is judged on the median of the same figure measured round by "
                "round (a ratio: of that round's medians), so that peers are compared under "
                "the same conditions; the spread is the interquartile range (p25–p75) of "
                "those per-round figures (RL: per step; B5: per process). The tables below "
                "pool every sample of the run. A missed goal says so.",
                "",
                "| target | median | spread over rounds | goal | status |",
                "|---|---:|---:|---:|---|",
                *rows,
                "",
            ]
        for section in self.sections:
            parts += [section, ""]
        if self.notes:
            parts += ["## Run notes", "", *[f"* {n}" for n in self.notes], ""]
        if analysis:
            parts += [analysis.strip(), ""]
        return "\n".join(parts)

    def text(self) -> str:
        """A console rendering: the same Markdown without the analysis."""
        return self.markdown(None)


def peer_label(name: str) -> str:
    return PEER_LABELS.get(name, name)


def machine_details() -> dict[str, str]:
    """What the figures depend on: CPU, cores, memory, versions."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            total_kb = int(info.readline().split()[1])
            memory = f"{total_kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    versions = []
    for package in ("firetitan", "aiohttp", "orjson", "numpy", "fireworks-ai", "tinker", "torch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return {
        "CPU": f"{cpu}, {usable} usable cores (of {os.cpu_count()})",
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
    }


def commit_measured(root: Path) -> str:
    """The commit the figures measure: ``git rev-parse HEAD``, and whether the working
    tree differs from it (files other than the report itself)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = [
            line[3:]
            for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
            if not line[3:].endswith("benchmarks/RESULTS.md")
        ]
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    if not changed:
        return f"{head} (clean)"
    shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
    return f"{head} + uncommitted changes in {len(changed)} file(s): {shown} (dirty)"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def read_analysis(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
