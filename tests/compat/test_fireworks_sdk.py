"""The public Fireworks training SDK (fireworks-ai 1.2.30), unchanged, against the local
trainer with the null engine: the documented flow end to end, with no warning or error
logged by the SDK.

The SDK runs in a child process (``sdk_child.py`` says why) with warnings as errors; the
trainer runs here, so the test can read its execution log and checkpoint store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local import LocalTrainer

from .sdk_child import run_flow


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[LocalTrainer, dict[str, Any]]]:
    with LocalTrainer("null", long_poll_seconds=5.0) as trainer:
        yield trainer, run_flow("tests.compat.fireworks_flow", trainer)


def executed(trainer: LocalTrainer, model_id: str) -> list[tuple[int | None, str]]:
    return [(r.seq_id, r.kind) for r in trainer.execution_log if r.model_id == model_id]


def test_documented_flow(run: tuple[LocalTrainer, dict[str, Any]]) -> None:
    trainer, summary = run
    flow = summary["documented_flow"]
    assert "already exists" in flow["duplicate_error"]
    logprobs = flow["forward_logprobs"]
    assert [len(lp) for lp in logprobs] == [4, 3]
    assert all(v <= 0 for lp in logprobs for v in lp)
    assert flow["fb_metrics"]["loss:sum"] == pytest.approx(flow["forward_metrics"]["loss:sum"])
    assert flow["fb_metrics"]["response_tokens"] == 7.0
    assert flow["optim_metrics"]["loss_tokens:sum"] == 7.0
    assert flow["custom_metrics"]["user_loss"] > 0
    assert flow["save_path"] == "step-1"
    assert flow["checkpoints"] == ["step-1"]
    assert flow["load_path"] == "step-1"
    (base_path, base_snapshot), (delta_path, delta_snapshot) = flow["sampler"]
    assert base_path == base_snapshot and base_path.startswith("sampler-")
    assert delta_path == delta_snapshot and delta_path.startswith("sampler-2-")
    for path, kind in ((base_path, "base"), (delta_path, "delta")):
        manifest = trainer.server.store.manifest("sampler", CheckpointRef(path))
        assert manifest is not None
        assert manifest.metadata["checkpoint_type"] == kind
    assert executed(trainer, flow["model_id"]) == [
        (0, "create_model"),
        (1, "forward"),
        (2, "forward_backward"),
        (3, "optim_step"),
        (4, "forward"),  # forward_backward_custom: the forward pass...
        (5, "forward_backward"),  # ...then the linearized backward
        (6, "save_weights"),
        (7, "load_weights"),
        (8, "save_weights_for_sampler"),
        (9, "save_weights_for_sampler"),
    ]


def test_failed_request_surfaces_and_the_sequence_continues(
    run: tuple[LocalTrainer, dict[str, Any]],
) -> None:
    trainer, summary = run
    flow = summary["failing_request"]
    failure = flow["failure"]
    assert failure["type"] == "RequestFailedError"
    assert "user" in failure["category"].lower()
    assert "target_tokens" in failure["message"]
    assert flow["outputs_after_failure"] == 1
    assert executed(trainer, flow["model_id"]) == [
        (0, "create_model"),
        (1, "forward"),
        (2, "forward"),
    ]


def test_the_sdk_logged_no_warning_or_error(run: tuple[LocalTrainer, dict[str, Any]]) -> None:
    _trainer, summary = run
    assert summary["sdk_problems"] == []
