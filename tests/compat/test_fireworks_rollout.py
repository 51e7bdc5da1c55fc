"""The public Fireworks training SDK (fireworks-ai 1.2.30), unchanged, runs the rollout
half against ``firetitan serve`` + ``firetitan deploy``: ``WeightSyncer.save_and_hotload``
three times (base, delta, delta), ``DeploymentManager.hotload_and_wait``,
``DeploymentSampler.sample_with_prompt_tokens`` with logprobs, and
``FiretitanSamplingClient.sample`` / ``compute_logprobs``.

The trainer (torch engine) runs here with a deployment beside it in a child process;
the SDK runs in another child (``sdk_child.py`` says why).
"""

from __future__ import annotations

from typing import Any

import pytest
from shared import BASE_MODEL

from firetitan.local import LocalTrainer

from .fireworks_rollout import CHECKPOINT_DIR, DEPLOYMENT_URL
from .sdk_child import run_flow

pytest.importorskip("fireworks.training.sdk", reason="needs the test extra (fireworks-ai)")


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    with LocalTrainer("torch", base_model=BASE_MODEL, deployment=True) as trainer:
        env = {
            DEPLOYMENT_URL: trainer.deployment.base_url,
            CHECKPOINT_DIR: str(trainer.checkpoint_dir),
        }
        return run_flow("tests.compat.fireworks_rollout", trainer, env=env, timeout=240)


def test_every_hot_load_serves_the_trainers_weights(summary: dict[str, Any]) -> None:
    assert summary["account"] == "local"
    assert len(summary["snapshots"]) == 3
    # 3 hot-loads x 3 samples x (raw, sampling) + 2 tinker samples + compute_logprobs
    assert len(summary["gaps"]) == 21
    assert max(summary["gaps"]) <= 1e-3
    assert summary["compute_logprobs_first"] is None


def test_hot_load_outcomes(summary: dict[str, Any]) -> None:
    assert summary["reload"] is True
    assert summary["unknown"] is False
    assert "never-saved-snapshot" in summary["unknown_message"]
    state = summary["unknown_state"]
    assert state["stage"] == "error" and state["target_snapshot_identity"] == "never-saved-snapshot"
    assert "no sampler snapshot 'never-saved-snapshot'" in state["message"]
    assert summary["corrupted"] is False
    state = summary["corrupted_state"]
    assert state["stage"] == "error" and "does not apply" in state["message"]
    assert "Checksum mismatch" in state["message"]
    assert summary["still_serving"] is True
    assert summary["problems"] == []
