"""End to end: supervised fine-tuning of the tiny stand-in through the engine."""

from __future__ import annotations

import tinker
from shared import SFT_CORPUS

from firetitan.local.torch import TorchEngine

from .helpers import full_model, sft_datum


def _nll(engine: TorchEngine, model_id: str) -> float:
    data = [sft_datum(t) for t in SFT_CORPUS]
    out = engine.forward(model_id, data, "cross_entropy", None)
    tokens = sum(d.model_input.length for d in data)
    return out.metrics["loss:sum"] / tokens


def test_200_sft_steps_halve_the_corpus_nll() -> None:
    engine = TorchEngine(device="cpu", size="tiny")
    m = full_model(engine, "m")
    data = [sft_datum(t) for t in SFT_CORPUS]
    before = _nll(engine, m)
    adam = tinker.AdamParams(learning_rate=2e-3, weight_decay=0.0, grad_clip_norm=1.0)
    for _ in range(200):
        engine.forward_backward(m, data, "cross_entropy", None)
        engine.optim_step(m, adam, "num_loss_tokens")
    after = _nll(engine, m)
    assert after <= 0.5 * before, (before, after)
