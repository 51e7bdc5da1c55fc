"""``firetitan demo``: RL fine-tuning end to end, on the embedded trainer or a remote one.

A small model learns to spell digits (``"7="`` -> ``"seven"``): a supervised warm-up on a
noisy corpus, then GRPO-style RL against a verifier, through the public async SDK only
(`firetitan.demo.loop` lists the calls). The run writes ``metrics.jsonl``, ``curves.png``
and ``summary.json`` into the output folder and prints where they are.

```python
from firetitan.demo import DemoConfig, run_demo

result = run_demo(DemoConfig(out_dir="demo-out"))
print(result.reward_first, "->", result.reward_last)
```

Modules: `task` (prompts, corpus, reward), `loop` (the SDK calls), `report` (metrics
file, progress bar, plot), `config` (settings), `command` (the CLI arguments).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TextIO

import attrs

from firetitan import DeploymentConfig
from firetitan.demo import task
from firetitan.demo.config import DemoConfig
from firetitan.demo.loop import DemoError, ResumeDrill, train
from firetitan.demo.report import MetricsLog, first_last_means, plot_curves

__all__ = ["DemoConfig", "DemoError", "DemoResult", "run_demo", "run_demo_async"]


@attrs.frozen(kw_only=True)
class DemoResult:
    """What a finished demo produced.

    Attributes:
        metrics_path: ``metrics.jsonl``, one JSON object per step.
        plot_path: ``curves.png``, the loss and reward curves.
        summary_path: ``summary.json``, the figures below in one object.
        seconds: Wall time of the whole run, trainer start included.
        reward_first: Mean reward of the first five RL steps.
        reward_last: Mean reward of the last five RL steps.
        resume: The resume drill's result.
        final_sampler_path: The trained policy's last sampler export.
        answers_before: The greedy answer to each prompt after the warm-up.
        answers_after: The greedy answer to each prompt after RL.
        rollouts_from: Where rollouts were sampled: ``deployment <url>`` (snapshots
            hot-loaded into it) or ``trainer``.
    """

    metrics_path: Path
    plot_path: Path
    summary_path: Path
    seconds: float
    reward_first: float
    reward_last: float
    resume: ResumeDrill
    final_sampler_path: str
    answers_before: dict[str, str]
    answers_after: dict[str, str]
    rollouts_from: str = "trainer"


def run_demo(cfg: DemoConfig, *, out: TextIO | None = None) -> DemoResult:
    """Run the demo to the end (blocking) and print a summary to ``out`` (stdout).

    Raises:
        DemoError: A remote model does not use the byte-level vocabulary.
        FiretitanError: A request to the trainer failed.
        RuntimeError: Called from a running event loop (use `run_demo_async`).
    """
    return asyncio.run(run_demo_async(cfg, out=out))


async def run_demo_async(cfg: DemoConfig, *, out: TextIO | None = None) -> DemoResult:
    """Run the demo on the caller's event loop; see `run_demo`."""
    start = time.perf_counter()
    out_dir = cfg.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    with MetricsLog(metrics_path, cfg.sft_steps + cfg.rl_steps, progress=cfg.progress) as log:
        if cfg.base_url is not None:
            outcome = await train(cfg, cfg.base_url, cfg.api_key, log, cfg.deployment)
        else:
            # Imported here: only the embedded trainer needs the engine's dependencies.
            from firetitan.local import LocalTrainer

            async with LocalTrainer(
                "torch", base_model=cfg.base_model, size="tiny", seed=cfg.seed, deployment=True
            ) as trainer:
                local = trainer.deployment
                deployment = DeploymentConfig(
                    base_url=local.base_url,
                    account=local.account,
                    deployment_id=local.deployment_id,
                    poll_interval=0.5,
                )
                outcome = await train(cfg, trainer.base_url, trainer.api_key, log, deployment)
    seconds = time.perf_counter() - start

    rewards = [r["reward_mean"] for r in log.rows if r["phase"] == "rl"]
    first, last = first_last_means(rewards)
    where = cfg.base_url or "the embedded trainer"
    plot_path = out_dir / "curves.png"
    await asyncio.to_thread(
        plot_curves, log.rows, plot_path, f"firetitan demo: spell a digit ({where})"
    )
    result = DemoResult(
        metrics_path=metrics_path,
        plot_path=plot_path,
        summary_path=out_dir / "summary.json",
        seconds=seconds,
        reward_first=first,
        reward_last=last,
        resume=outcome.resume,
        final_sampler_path=outcome.final_sampler_path,
        answers_before=outcome.answers_before,
        answers_after=outcome.answers_after,
        rollouts_from=outcome.rollouts_from,
    )
    _write_summary(result, cfg)
    _print_summary(result, cfg, out or sys.stdout)
    return result


def _write_summary(result: DemoResult, cfg: DemoConfig) -> None:
    summary = {
        "seconds": result.seconds,
        "sft_steps": cfg.sft_steps,
        "rl_steps": cfg.rl_steps,
        "reward_first5_mean": result.reward_first,
        "reward_last5_mean": result.reward_last,
        "resume_drill": attrs.asdict(result.resume),
        "final_sampler_path": result.final_sampler_path,
        "answers_before_rl": result.answers_before,
        "answers_after_rl": result.answers_after,
        "rollouts_from": result.rollouts_from,
    }
    result.summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _answers(answers: dict[str, str]) -> str:
    shown = "  ".join(f"{prompt}{answer or '(nothing)'}" for prompt, answer in answers.items())
    return f"{shown}   ({task.count_right(answers)}/{len(task.DIGITS)} right)"


def _print_summary(result: DemoResult, cfg: DemoConfig, out: TextIO) -> None:
    drill = result.resume
    same = "identical" if drill.max_abs_logprob_diff == 0 else "differ"
    print(
        f"firetitan demo finished in {result.seconds:.1f} s "
        f"({cfg.sft_steps} warm-up steps, {cfg.rl_steps} RL steps)\n"
        f"reward: first 5 RL steps {result.reward_first:.2f} -> "
        f"last 5 RL steps {result.reward_last:.2f}\n"
        f"resume drill before RL step {drill.step}: restored {drill.checkpoint!r} with its "
        f"optimizer; logprobs {same} (max difference {drill.max_abs_logprob_diff:.3g})\n"
        f"greedy answers after the warm-up: {_answers(result.answers_before)}\n"
        f"greedy answers after RL:          {_answers(result.answers_after)}\n"
        f"rollouts sampled from the {result.rollouts_from}\n"
        f"outputs:\n"
        f"  metrics  {result.metrics_path}\n"
        f"  plot     {result.plot_path}\n"
        f"  summary  {result.summary_path}",
        file=out,
    )
