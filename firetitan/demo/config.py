"""The demo's settings: where it runs, how long, and the hyperparameters that work.

The defaults were tuned on the ``tiny`` stand-in (2 layers, hidden 256) so that the full
run takes well under three minutes on two CPU cores and the mean reward of the last five
RL steps ends far above that of the first five (see `firetitan.demo.task` for the task).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from firetitan import DeploymentConfig
from firetitan.demo import task
from firetitan.local import DEFAULT_BASE_MODEL

__all__ = ["DEFAULT_BASE_MODEL", "DemoConfig"]


def _at_least(minimum: int) -> Callable[[Any, attrs.Attribute[int], object], None]:
    def check(_inst: Any, attribute: attrs.Attribute[int], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class DemoConfig:
    """What `run_demo` does.

    Attributes:
        out_dir: Where ``metrics.jsonl``, ``curves.png`` and ``summary.json`` go.
        base_url: A remote trainer's URL; None starts the embedded local trainer.
        api_key: The remote trainer's key (None reads the usual environment variables).
        base_model: The model to train. A remote model must use the byte-level
            vocabulary of the local trainer's stand-ins (the task is written in it).
        seed: Seeds the corpus, the trainer and every sampling request.
        sft_steps: Supervised warm-up steps.
        sft_batch: Examples per warm-up step.
        corpus_size: Examples in the warm-up corpus.
        sft_learning_rate: AdamW learning rate of the warm-up.
        rl_steps: RL steps; the resume drill runs before step ``rl_steps // 2``.
        group_size: Samples per prompt (one group); advantages are relative to it.
        rl_learning_rate: AdamW learning rate of the RL phase.
        kl_beta: Weight of the per-token KL penalty against the reference model.
        substeps: Optimizer steps per RL batch (the batch is split by groups).
        max_tokens: Longest completion sampled.
        rebase_every: Publish full weights (``base``) every this many sampler exports
            and ``delta`` exports in between, so a sampler never replays a long chain.
        progress: Show a progress bar (on stderr).
        deployment: Where rollouts are sampled with a remote trainer: a hot-load
            deployment (each export is hot-loaded into it and sampled there). None
            samples on the remote trainer. The embedded trainer always brings its own
            local deployment.
    """

    out_dir: Path = attrs.field(converter=Path, default=Path("firetitan-demo"))
    base_url: str | None = None
    api_key: str | None = None
    base_model: str = DEFAULT_BASE_MODEL
    seed: int = 0
    sft_steps: int = attrs.field(default=60, validator=_at_least(1))
    sft_batch: int = attrs.field(default=32, validator=_at_least(1))
    corpus_size: int = attrs.field(default=256, validator=_at_least(1))
    sft_learning_rate: float = 2e-3
    rl_steps: int = attrs.field(default=50, validator=_at_least(2))
    group_size: int = attrs.field(default=16, validator=_at_least(2))
    rl_learning_rate: float = 5e-4
    kl_beta: float = 0.05
    # At most one slice per prompt group: the batch is split by groups.
    substeps: int = attrs.field(
        default=2, validator=[_at_least(1), attrs.validators.le(len(task.DIGITS))]
    )
    max_tokens: int = attrs.field(default=8, validator=_at_least(1))
    rebase_every: int = attrs.field(default=10, validator=_at_least(1))
    progress: bool = True
    deployment: DeploymentConfig | None = None

    def quick(self) -> DemoConfig:
        """A few steps of everything: checks the whole pipeline, learns little."""
        return attrs.evolve(
            self, sft_steps=3, sft_batch=8, rl_steps=4, group_size=4, rebase_every=3
        )
