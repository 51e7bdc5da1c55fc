"""optim_step: AdamW against torch.optim.AdamW, normalization modes, clipping, zeroing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
import torch

from firetitan.local.engine import UserError
from firetitan.local.torch import TorchEngine

from .helpers import full_model, grads, sft_datum, weights

# Two requests in one window: 1 + 2 datums; weights with zeros make the token and
# sequence counts differ from the raw lengths.
_W1 = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
_REQUESTS = [
    [sft_datum("first call", _W1)],
    [sft_datum("second"), sft_datum("third one", [0.0] * 10)],
]
_LOSS_TOKENS = 9 + 7  # non-zero weights in datum 1 + all of datum 2 + none of datum 3
_SEQUENCES = 2  # datum 3 has no loss token


def _accumulate(engine: TorchEngine, model_id: str) -> None:
    for request in _REQUESTS:
        engine.forward_backward(model_id, request, "cross_entropy", None)


def _norm(g: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in g.values()))


@pytest.mark.parametrize(
    ("mode", "divisor"),
    [(None, 1), ("none", 1), ("num_loss_tokens", _LOSS_TOKENS), ("num_sequences", _SEQUENCES)],
)
def test_normalization_divides_by_the_window_count(
    engine: TorchEngine, mode: str | None, divisor: int
) -> None:
    m = full_model(engine, "m")
    _accumulate(engine, m)
    assert engine.window_counts(m) == (_LOSS_TOKENS, _SEQUENCES)
    raw = _norm(grads(engine, m))
    metrics = engine.optim_step(m, tinker.AdamParams(learning_rate=1e-3), mode)
    assert metrics["grad_norm:max"] == pytest.approx(raw / divisor, rel=1e-5)
    assert all(torch.count_nonzero(g) == 0 for g in grads(engine, m).values())
    assert engine.window_counts(m) == (0, 0)


def test_rl_loss_tokens_count_nonzero_advantages_and_weights(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    d = sft_datum("abcdef")  # 7 positions
    datum = tinker.Datum(
        model_input=d.model_input,
        loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": np.full(7, -5.0, np.float32),
            "advantages": np.array([0, 1, 1, 1, -1, 0, 2], np.float32),
            "weights": np.array([1, 1, 0, 1, 1, 1, 1], np.float32),
        },
    )
    engine.forward_backward(m, [datum], "ppo", None)
    assert engine.window_counts(m) == (4, 1)


def test_a_window_without_loss_tokens_leaves_a_zero_gradient(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    before = weights(engine, m)
    engine.forward_backward(m, [sft_datum("masked", [0.0] * 7)], "cross_entropy", None)
    metrics = engine.optim_step(m, tinker.AdamParams(learning_rate=1e-2), "num_loss_tokens")
    assert metrics["grad_norm:max"] == 0.0
    after = weights(engine, m)
    # fresh moments and a zero gradient: Adam moves nothing
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adamw_matches_torch_with_per_step_hyperparameters(engine: TorchEngine) -> None:
    """Two steps whose lr, betas, eps, weight decay and clipping all differ."""
    m = full_model(engine, "m")
    ref = {
        n: p.detach().clone().requires_grad_(True) for n, p in engine.module(m).named_parameters()
    }
    opt = torch.optim.AdamW(list(ref.values()), foreach=False)
    fields = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    steps = [
        tinker.AdamParams(**dict(zip(fields, values, strict=True)))
        for values in [(3e-3, 0.9, 0.95, 1e-8, 0.1, 0.5), (1e-3, 0.8, 0.99, 1e-6, 0.0, 0.0)]
    ]
    for adam in steps:
        _accumulate(engine, m)
        g = grads(engine, m)
        g = {n: t / _LOSS_TOKENS for n, t in g.items()}
        norm = _norm(g)
        metrics = engine.optim_step(m, adam, "num_loss_tokens")
        assert metrics["grad_norm:max"] == pytest.approx(norm, rel=1e-5)
        assert metrics["learning_rate:unique"] == adam.learning_rate
        scale = adam.grad_clip_norm / norm if 0 < adam.grad_clip_norm < norm else 1.0
        for n, p in ref.items():
            p.grad = g[n] * scale
        group = opt.param_groups[0]
        group.update(
            lr=adam.learning_rate,
            betas=(adam.beta1, adam.beta2),
            eps=adam.eps,
            weight_decay=adam.weight_decay,
        )
        opt.step()
        got = dict(engine.module(m).named_parameters())
        for n, p in ref.items():
            torch.testing.assert_close(got[n].detach(), p.detach(), rtol=1e-6, atol=1e-7)
    assert metrics["optim_step:max"] == 2.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", -1.0),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("eps", math.nan),
        ("weight_decay", -1.0),
        ("grad_clip_norm", math.inf),
    ],
)
def test_bad_adam_params_are_user_errors_and_change_nothing(
    engine: TorchEngine, field: str, value: float
) -> None:
    m = full_model(engine, "m")
    _accumulate(engine, m)
    before_w, before_g = weights(engine, m), grads(engine, m)
    adam = tinker.AdamParams().model_copy(update={field: value})
    with pytest.raises(UserError, match=field):
        engine.optim_step(m, adam, None)
    assert all(torch.equal(before_w[k], v) for k, v in weights(engine, m).items())
    assert all(torch.equal(before_g[k], v) for k, v in grads(engine, m).items())


def test_unknown_normalization_is_a_user_error(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    with pytest.raises(UserError, match="grad_accumulation_normalization"):
        engine.optim_step(m, tinker.AdamParams(), "per_token")
