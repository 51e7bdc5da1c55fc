"""The public ``tinker`` 0.38 SDK, unchanged, against the local trainer with the torch
engine: training (protobuf forward_backward, pipelined with optim_step), forward, save
and resume with the optimizer, sampling, and a short SFT loop whose loss falls, with no
warning or error logged by the SDK.

The SDK runs in a child process (``sdk_child.py`` says why) with warnings as errors; the
trainer runs here, so the test can read its execution log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from shared import BASE_MODEL

from firetitan.local import LocalTrainer
from firetitan.tokenizers import ByteTokenizer

from .sdk_child import run_flow

# Prompt (weight 0) and completion (weight 1), as tinker-cookbook renders SFT examples.
SFT_PAIRS = [
    ("Q: cat\nA:", " meow"),
    ("Q: dog\nA:", " woof"),
    ("Q: cow\nA:", " moo"),
    ("Q: owl\nA:", " hoot"),
]

Run = tuple[LocalTrainer, dict[str, Any]]


def _inputs() -> dict[str, Any]:
    tok = ByteTokenizer()
    sft = []
    for prompt, completion in SFT_PAIRS:
        head, tail = tok.encode(prompt, add_bos=True), tok.encode(completion, add_eos=True)
        sft.append([head + tail, [0.0] * len(head) + [1.0] * len(tail)])
    return {
        "base_model": BASE_MODEL,
        "prompt": tok.encode("Q: cat\nA:", add_bos=True),
        "vocab": tok.vocab_size,
        "sft": sft,
    }


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    inputs = _inputs()
    # A long poll longer than any request here, so the SDK never sees a try_again
    # (it logs each one as a warning): on a loaded machine the first create_model can
    # take over 20 s. tinker reads a poll for up to 45 s.
    with LocalTrainer("torch", size="tiny", device="cpu", long_poll_seconds=40.0) as trainer:
        report = run_flow("tests.compat.tinker_flow", trainer, stdin=json.dumps(inputs))
        yield trainer, {**report, "inputs": inputs}


def executed(trainer: LocalTrainer, model_id: str) -> list[tuple[int | None, str]]:
    return [(r.seq_id, r.kind) for r in trainer.execution_log if r.model_id == model_id]


def test_training_client(run: Run) -> None:
    trainer, report = run
    flow = report["training"]
    first, second = flow["fb_losses"]
    assert second < first  # the second forward_backward ran after the first optim_step
    assert flow["forward_loss"] < second
    assert flow["optim_metrics"]["optim_step:max"] == 1.0
    assert [len(lp) for lp in flow["forward_logprobs"]] == [4, 3]
    assert all(v < 0 for lp in flow["forward_logprobs"] for v in lp)
    assert executed(trainer, flow["model_id"])[:7] == [
        (0, "create_model"),
        (1, "forward_backward"),  # protobuf bodies...
        (2, "optim_step"),
        (3, "forward_backward"),
        (4, "optim_step"),
        (5, "forward"),  # ...forward_only for a forward
        (6, "save_weights"),
    ]


def test_save_state_and_resume_with_optimizer(run: Run) -> None:
    trainer, report = run
    flow = report["training"]
    assert flow["save_path"] == f"tinker://{trainer.job_id}/weights/step-2"
    # Created through load_weights, under the id the client derived.
    session_id = flow["model_id"].rsplit(":train:", 1)[0]
    assert flow["resumed_model_id"] == f"{session_id}:train:1"
    assert executed(trainer, flow["resumed_model_id"])[0] == (0, "load_weights")
    assert flow["resumed_forward_loss"] == pytest.approx(flow["forward_loss"], rel=1e-5)
    original, resumed = flow["next_step_losses"]
    assert resumed == pytest.approx(original, rel=1e-5)
    assert resumed < flow["resumed_forward_loss"]


def test_weights_info_and_copy_weights(run: Run) -> None:
    trainer, report = run
    flow = report["training"]
    info = flow["weights_info"]
    assert info["base_model"] == BASE_MODEL and info["is_lora"] and info["lora_rank"] == 4
    run_id, segment, name = flow["copied_path"].removeprefix("tinker://").split("/")
    assert run_id.startswith("copy-") and run_id != trainer.job_id
    assert (segment, name) == ("weights", "step-2")
    # A model started from the copy has the saved weights: the resumed model's loss.
    assert flow["from_copy_loss"] == pytest.approx(flow["resumed_forward_loss"], rel=1e-6)


def test_save_state_refuses_an_existing_name_unless_overwrite(run: Run) -> None:
    flow = run[1]["training"]
    assert flow["resave_error"] is not None
    assert "this model already saved a checkpoint named 'step-2'" in flow["resave_error"]
    assert "overwrite=True" in flow["resave_error"]
    assert flow["overwrite_path"] == flow["save_path"]
    # The replaced checkpoint holds the weights at the time of the second save.
    assert flow["replaced_forward_loss"] == pytest.approx(flow["current_forward_loss"], rel=1e-5)
    assert flow["replaced_forward_loss"] != pytest.approx(flow["forward_loss"], rel=1e-3)


def test_gspo_with_the_cookbook_mask(run: Run) -> None:
    """On policy (sampled from the weights it trains), the sequence ratio is 1: the loss is
    -Σ A over the sampled tokens; the mask the cookbook sends marks exactly the positions
    that carry the loss, so leaving it out changes nothing."""
    flow = run[1]["gspo"]
    assert flow["loss"] == pytest.approx(-0.5 * flow["sampled"], rel=1e-3)
    assert flow["loss_without_mask"] == flow["loss"]
    assert flow["trained_loss"] == flow["loss"]
    assert flow["optim_steps"] == 1.0


def test_sampling_client(run: Run) -> None:
    trainer, report = run
    flow, prompt = report["sampling"], report["inputs"]["prompt"]
    samples = flow["samples"]
    assert len(samples) == 3
    assert len({s["sequence_id"] for s in samples}) == 3
    for sample in samples:
        assert 1 <= len(sample["tokens"]) <= 6
        assert len(sample["logprobs"]) == len(sample["tokens"])
        assert all(v <= 0 for v in sample["logprobs"])
    # compute_logprobs: one per prompt token, none for the first.
    logprobs = flow["prompt_logprobs"]
    assert len(logprobs) == len(prompt)
    assert logprobs[0] is None
    assert all(v is not None and v < 0 for v in logprobs[1:])
    last_two = flow["last_two_logprobs"]
    assert last_two[:-2] == [None] * (len(prompt) - 2)
    assert last_two[-2:] == pytest.approx(logprobs[-2:])
    # A named export comes back as a tinker:// path that samples again.
    assert flow["sampler_path"] == f"tinker://{trainer.job_id}/sampler_weights/exported"
    assert flow["named_base_model"] == BASE_MODEL
    assert 1 <= len(flow["named_sample"]) <= 6


def test_sampling_scores_match_forward(run: Run) -> None:
    """Top-k, target and alternative-token logprobs, as tinker reads them, equal the
    trainer's own ``forward`` logprobs; bad options are refused naming the field."""
    _trainer, report = run
    prompt, scores = report["inputs"]["prompt"], report["sampling"]["scores"]
    expected = np.asarray(scores["forward"])  # (len(prompt) - 1, vocab)
    rows = len(prompt) - 1
    top = scores["topk_prompt"]
    assert len(top) == len(prompt) and top[0] is None
    for i, row in enumerate(top[1:]):
        assert len(row) == 3
        assert [lp for _t, lp in row] == sorted((lp for _t, lp in row), reverse=True)
        assert row[0][0] == int(np.argmax(expected[i]))
        assert all(abs(lp - expected[i, tok]) < 1e-4 for tok, lp in row)
    for tokens, sampled in zip(scores["sampled"], scores["topk_sampled"], strict=True):
        assert len(sampled) == len(tokens) and all(len(r) == 2 for r in sampled)
    asked = np.asarray(scores["dense_asked"])
    assert scores["target_shape"] == [rows, 2]
    want = np.where(asked >= 0, expected[np.arange(rows)[:, None], asked.clip(0)], 0.0)
    np.testing.assert_allclose(scores["target"], want, atol=1e-4)
    drawn = np.asarray(scores["alt_tokens"])
    assert drawn.shape == (rows, 2)
    np.testing.assert_allclose(
        scores["alt_logprobs"], expected[np.arange(rows)[:, None], drawn], atol=1e-4
    )
    sparse = scores["sparse"]
    assert sparse["crow"] == [0, 0, 1] + [2] * (rows - 2) and sparse["col"] == [1, 2]
    np.testing.assert_allclose(sparse["data"], [expected[1, prompt[2]], expected[2, 7]], atol=1e-4)
    too_wide, wrong_rows = report["refused"]
    assert "topk_prompt_logprobs must be an integer in [0, " in too_wide
    assert "target_prompt_logprobs must have shape [len(prompt) - 1, K]" in wrong_rows


def test_sft_loss_falls(run: Run) -> None:
    _trainer, report = run
    losses = report["sft"]["losses"]
    assert len(losses) == 12
    assert losses[-1] < 0.3 * losses[0], losses
    assert losses[-1] < min(losses[:6]), losses


def test_the_sdk_logged_no_warning_or_error(run: Run) -> None:
    _trainer, report = run
    assert report["sdk_problems"] == []
