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
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import attrs

__all__ = ["Report", "Target", "machine_details", "median", "quantile"]

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
    """One goal of the issue: ``figure <= goal`` (or ``<`` when ``strict``)."""

    name: str
    figure: float
    goal: float
    unit: str
    strict: bool = False

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
                f"| {t.name} | {fmt(t.figure)} {t.unit} | {'<' if t.strict else '≤'} "
                f"{fmt(t.goal)} {t.unit} | {t.status()} |"
                for t in self.targets
            ]
            parts += [
                "## Targets",
                "",
                "| target | figure | goal | status |",
                "|---|---:|---:|---|",
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
