"""The public Fireworks training SDK (fireworks-ai 1.2.30), unchanged, really trains the
local trainer's tiny stand-in: 200 full-parameter SFT steps at least halve the NLL of a
small fixed corpus, with no warning or error logged by the SDK.

The SDK runs in a child process (``sdk_child.py`` says why) with warnings as errors; the
trainer runs here, so the test can read its execution log.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from shared import BASE_MODEL, SFT_CORPUS

from firetitan.local import LocalTrainer
from firetitan.tokenizers import ByteTokenizer

from .sdk_child import run_flow

STEPS = 200

Run = tuple[LocalTrainer, dict[str, Any]]


def _inputs() -> dict[str, Any]:
    tok = ByteTokenizer()
    return {
        "base_model": BASE_MODEL,
        "corpus": [tok.encode(text, add_bos=True, add_eos=True) for text in SFT_CORPUS],
        "steps": STEPS,
        "learning_rate": 2e-3,
    }


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    # A long poll longer than any request here, so the SDK never sees a try_again.
    with LocalTrainer("torch", size="tiny", device="cpu", long_poll_seconds=20.0) as trainer:
        yield trainer, run_flow("tests.compat.fireworks_sft", trainer, stdin=json.dumps(_inputs()))


def test_200_sft_steps_halve_the_corpus_nll(run: Run) -> None:
    trainer, report = run
    before, after = report["nll_before"], report["nll_after"]
    assert after <= 0.5 * before, (before, after)
    losses = report["fb_losses"]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0], (losses[0], losses[-1])
    kinds = Counter(r.kind for r in trainer.execution_log if r.model_id == report["model_id"])
    assert kinds == {
        "create_model": 1,
        "forward": 2,
        "forward_backward": STEPS,
        "optim_step": STEPS,
    }


def test_the_sdk_logged_no_warning_or_error(run: Run) -> None:
    _trainer, report = run
    assert report["sdk_problems"] == []
