"""A refused forward_backward or optim_step changes nothing: the model then trains
bit-identically to one that never saw the refused request."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinker
import torch

from firetitan.local.engine import UserError
from firetitan.local.torch import TorchEngine

from .helpers import bit_equal, full_model, grads, lora_model, sft_batch, sft_datum, weights

ADAM = tinker.AdamParams(learning_rate=1e-3)
HUGE_WEIGHTS = sft_datum("hello world", [1e30] * 12)


def _engines(lora: bool) -> tuple[TorchEngine, TorchEngine, str]:
    make = lora_model if lora else full_model
    tested, reference = (TorchEngine(size="tiny", device="cpu", seed=0) for _ in range(2))
    make(tested, "m")
    make(reference, "m")
    return tested, reference, "m"


def _state_files(engine: TorchEngine, model_id: str, directory: Path) -> dict[str, bytes]:
    directory.mkdir()
    engine.save_state(model_id, directory)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradients_too_large_to_use_are_refused_at_forward_backward(
    lora: bool, tmp_path: Path
) -> None:
    tested, reference, m = _engines(lora)
    batch = sft_batch()
    tested.forward_backward(m, batch[:2], "cross_entropy", None)
    before, counts = grads(tested, m), tested.window_counts(m)
    with pytest.raises(UserError, match=r"too large to use.*'weights'.*unchanged"):
        tested.forward_backward(m, [HUGE_WEIGHTS], "cross_entropy", None)
    assert bit_equal(grads(tested, m), before)
    assert tested.window_counts(m) == counts

    reference.forward_backward(m, batch[:2], "cross_entropy", None)
    for engine in (tested, reference):
        engine.forward_backward(m, batch[2:], "cross_entropy", None)
        engine.optim_step(m, ADAM, "num_loss_tokens")
    assert bit_equal(weights(tested, m), weights(reference, m))
    assert _state_files(tested, m, tmp_path / "a") == _state_files(reference, m, tmp_path / "b")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_update_that_would_make_weights_non_finite_changes_nothing(
    lora: bool, tmp_path: Path
) -> None:
    tested, reference, m = _engines(lora)
    for engine in (tested, reference):
        engine.forward_backward(m, sft_batch(), "cross_entropy", None)
        engine.optim_step(m, ADAM, "num_loss_tokens")  # non-zero moments and step count
        engine.forward_backward(m, sft_batch(), "cross_entropy", None)
    before, counts = weights(tested, m), tested.window_counts(m)
    gradients = grads(tested, m)
    with pytest.raises(UserError, match=r"would make the weights non-finite.*learning_rate=1e\+38"):
        tested.optim_step(m, tinker.AdamParams(learning_rate=1e38), "num_loss_tokens")
    assert bit_equal(weights(tested, m), before)
    assert bit_equal(grads(tested, m), gradients)
    assert tested.window_counts(m) == counts

    for engine in (tested, reference):
        metrics = engine.optim_step(m, ADAM, "num_loss_tokens")
        assert metrics["optim_step:max"] == 2.0  # the refused step did not count
    assert bit_equal(weights(tested, m), weights(reference, m))
    assert _state_files(tested, m, tmp_path / "a") == _state_files(reference, m, tmp_path / "b")


@pytest.mark.parametrize("eps", [0.0, -1e-8])
def test_eps_must_be_positive(engine: TorchEngine, eps: float) -> None:
    m = full_model(engine, "m")
    engine.forward_backward(m, sft_batch(), "cross_entropy", None)
    before = weights(engine, m)
    with pytest.raises(UserError, match="eps"):
        engine.optim_step(m, tinker.AdamParams(learning_rate=1e-3, eps=eps), None)
    assert bit_equal(weights(engine, m), before)


def test_non_finite_outputs_blame_the_weights_not_the_inputs(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    with torch.no_grad():
        for p in engine.module(m).parameters():
            p.fill_(float("inf"))  # weights from elsewhere (a hand-edited checkpoint)
    with pytest.raises(UserError, match="datum 0: the model's log-probabilities are not finite"):
        engine.forward(m, [sft_datum("abc")], "cross_entropy", None)
