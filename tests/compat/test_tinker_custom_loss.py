"""tinker 0.38's server-side custom losses against the torch engine: the trainer's client
configuration turns ``custom_loss_server_side`` on, tinker uploads its traced loss, and
the loss the trainer runs gives the same loss, metrics and weights after ``optim_step``
as tinker's own client-side run of the same loss and as the equivalent built-in loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from firetitan.local import LocalTrainer

from .sdk_child import run_flow
from .test_tinker_sdk import executed

Run = tuple[LocalTrainer, dict[str, Any]]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with LocalTrainer("torch", size="tiny", device="cpu", long_poll_seconds=20.0) as trainer:
        yield trainer, run_flow("tests.compat.tinker_custom_loss_flow", trainer)


def test_the_loss_is_uploaded_and_runs_in_one_forward_backward(run: Run) -> None:
    trainer, report = run
    server, client_side, _builtin = report["model_ids"]
    assert report["loss_id"]
    session_id = server.rsplit(":train:", 1)[0]
    assert report["loss_id"].startswith(f"{session_id}:loss:")
    # On the trainer: one forward_backward. Client-side: a forward, then a backward.
    assert executed(trainer, server)[1:3] == [(1, "forward_backward"), (2, "optim_step")]
    assert executed(trainer, client_side)[1:4] == [
        (1, "forward"),
        (2, "forward_backward"),
        (3, "optim_step"),
    ]


def test_server_side_equals_client_side_and_builtin(run: Run) -> None:
    _trainer, report = run
    metrics = report["metrics"]
    server, client_side, builtin = metrics["server"], metrics["client"], metrics["builtin"]
    assert server["loss:sum"] == pytest.approx(client_side["loss:sum"], rel=1e-5)
    assert server["loss:sum"] == pytest.approx(builtin["loss:sum"], rel=1e-5)
    for key in ("custom/ratio:mean", "custom/active:sum"):
        assert server[key] == pytest.approx(client_side[key], rel=1e-5)
    assert server["custom/active:sum"] == 7.0  # the non-zero advantages
    after = report["logprobs"]
    for other in ("client", "builtin"):
        for mine, theirs in zip(after["server"], after[other], strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)
    # The step moved the weights: the models compared are not untouched ones.
    moved = [
        abs(a - b)
        for after_seq, before_seq in zip(after["server"], report["logprobs_before"], strict=True)
        for a, b in zip(after_seq, before_seq, strict=True)
    ]
    assert max(moved) > 1e-3


def test_the_sdk_logged_no_warning_or_error(run: Run) -> None:
    _trainer, report = run
    assert report["sdk_problems"] == []
