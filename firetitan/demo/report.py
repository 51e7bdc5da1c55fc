"""The demo's outputs: ``metrics.jsonl`` as steps finish, a live progress bar, and a
PNG of the loss and reward curves at the end.

``metrics.jsonl`` holds one JSON object per step. Every row has ``phase`` (``"sft"`` or
``"rl"``), ``step`` (counted per phase from 0), ``loss`` (per trained token: the warm-up's
cross-entropy, or the RL surrogate) and ``tokens_per_s`` (warm-up: tokens trained per
second; RL: tokens sampled per second of rollout). RL rows add ``reward_mean`` (the share
of correct answers), ``kl`` (per sampled token, against the reference), the sampled
token count, the export kind and the step's seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsLog", "first_last_means", "plot_curves"]

#: Steps averaged at each end of the RL phase for the summary.
WINDOW = 5


class MetricsLog:
    """Appends each step's row to ``metrics.jsonl`` and shows it on a progress bar.

    Use it as a context manager; rows are flushed as they arrive, so the file can be
    followed while the demo runs.
    """

    def __init__(self, path: Path, total_steps: int, *, progress: bool) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._file: TextIO = path.open("w", encoding="utf-8")
        self._bar: Any = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=True)

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._bar is not None:
            self._bar.set_description(row["phase"])
            self._bar.set_postfix_str(_postfix(row), refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _postfix(row: dict[str, Any]) -> str:
    parts = []
    if "reward_mean" in row:
        parts.append(f"reward={row['reward_mean']:.2f}")
    parts.append(f"loss={row['loss']:.3f}")
    if "kl" in row:
        parts.append(f"kl={row['kl']:.3f}")
    parts.append(f"tok/s={row['tokens_per_s']:.0f}")
    return " ".join(parts)


def first_last_means(rewards: Sequence[float], window: int = WINDOW) -> tuple[float, float]:
    """Mean of the first and of the last ``window`` values (fewer if there are fewer)."""
    if not rewards:
        return math.nan, math.nan
    k = min(window, len(rewards))
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Draw the warm-up loss and the RL reward (with a moving average) side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    sft = [r for r in rows if r["phase"] == "sft"]
    rl = [r for r in rows if r["phase"] == "rl"]
    fig, (ax_loss, ax_reward) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        ax_loss.plot([r["step"] for r in sft], [r["loss"] for r in sft], color="tab:blue")
        ax_loss.set_title("SFT warm-up: cross-entropy per token")
        ax_loss.set_xlabel("SFT step")
        ax_loss.set_ylabel("loss")
        ax_loss.grid(alpha=0.3)

        steps = [r["step"] for r in rl]
        rewards = [r["reward_mean"] for r in rl]
        ax_reward.plot(steps, rewards, color="tab:green", alpha=0.45, label="reward (mean)")
        ax_reward.plot(
            steps,
            _moving_average(rewards, WINDOW),
            color="tab:green",
            linewidth=2.2,
            label=f"{WINDOW}-step moving average",
        )
        first, last = first_last_means(rewards)
        if rl:
            ax_reward.axhline(first, color="grey", linestyle=":", linewidth=1)
            ax_reward.axhline(last, color="black", linestyle="--", linewidth=1)
            ax_reward.annotate(
                f"first {WINDOW}: {first:.2f}   last {WINDOW}: {last:.2f}",
                xy=(0.02, 0.95),
                xycoords="axes fraction",
                va="top",
            )
        for r in rl:
            if "resumed_from" in r:  # the curve should run on smoothly across it
                ax_reward.axvline(
                    r["step"] - 0.5, color="tab:purple", linestyle="-.", label="resume drill"
                )
        ax_reward.set_ylim(-0.02, 1.02)
        ax_reward.set_title("RL: reward (share of correct answers)")
        ax_reward.set_xlabel("RL step")
        ax_reward.set_ylabel("reward")
        ax_reward.grid(alpha=0.3)
        ax_kl = ax_reward.twinx()
        ax_kl.plot(
            steps,
            [r["kl"] for r in rl],
            color="tab:red",
            alpha=0.5,
            linewidth=1,
            label="KL to reference (right axis)",
        )
        ax_kl.set_ylabel("KL to reference, per token", color="tab:red")
        ax_kl.tick_params(axis="y", colors="tab:red")
        lines = ax_reward.get_legend_handles_labels()
        kl_lines = ax_kl.get_legend_handles_labels()
        ax_reward.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], loc="lower right")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
