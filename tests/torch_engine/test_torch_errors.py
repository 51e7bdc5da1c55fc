"""User errors name the datum and the field, and leave the model untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tinker
import torch

from firetitan.local.engine import UserError
from firetitan.local.torch import TorchEngine

from .helpers import TOK, full_model, grads, sft_datum

GOOD = sft_datum("a good datum")
IDS = TOK.encode("bad one", add_bos=True)
N = len(IDS)


def _rl_inputs(**override: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "target_tokens": np.asarray([*IDS[1:], 257], np.int64),
        "logprobs": np.full(N, -1.0, np.float32),
        "advantages": np.ones(N, np.float32),
    }
    inputs.update(override)
    return {k: v for k, v in inputs.items() if v is not None}


def _datum(tokens: list[int] | None = None, **inputs: Any) -> tinker.Datum:
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(IDS if tokens is None else tokens),
        loss_fn_inputs=inputs,
    )


def _image_datum() -> tinker.Datum:
    from tinker.types.image_chunk import ImageChunk

    chunk = ImageChunk(data=b"\x89PNG\r\n", format="png", expected_tokens=4)
    return tinker.Datum(
        model_input=tinker.ModelInput(chunks=[tinker.EncodedTextChunk(tokens=IDS), chunk]),
        loss_fn_inputs={"target_tokens": np.zeros(N + 4, np.int64)},
    )


CASES: list[tuple[str, str, Callable[[], tinker.Datum], str]] = [
    ("cross_entropy", "missing target", lambda: _datum(), "target_tokens"),
    ("ppo", "missing advantages", lambda: _datum(**_rl_inputs(advantages=None)), "advantages"),
    (
        "cross_entropy",
        "short targets",
        lambda: _datum(target_tokens=np.zeros(N - 1, np.int64)),
        "target_tokens",
    ),
    (
        "cross_entropy",
        "weights shape",
        lambda: _datum(target_tokens=np.zeros(N, np.int64), weights=np.ones(N + 1, np.float32)),
        "weights",
    ),
    (
        "importance_sampling",
        "logprobs shape",
        lambda: _datum(**_rl_inputs(logprobs=np.zeros(N - 2, np.float32))),
        "logprobs",
    ),
    (
        "cross_entropy",
        "input id out of vocab",
        lambda: _datum(tokens=[*IDS[:-1], 5000], target_tokens=np.zeros(N, np.int64)),
        "model_input",
    ),
    (
        "cross_entropy",
        "negative target",
        lambda: _datum(target_tokens=np.full(N, -1, np.int64)),
        "target_tokens",
    ),
    (
        "cross_entropy",
        "target out of vocab",
        lambda: _datum(target_tokens=np.full(N, 264, np.int64)),
        "target_tokens",
    ),
    (
        "dro",
        "nan advantage",
        lambda: _datum(**_rl_inputs(advantages=np.full(N, np.nan, np.float32))),
        "advantages",
    ),
    (
        "cross_entropy",
        "inf weight",
        lambda: _datum(target_tokens=np.zeros(N, np.int64), weights=np.full(N, np.inf, np.float32)),
        "weights",
    ),
    (
        "ppo",
        "2-D targets for an RL loss",
        lambda: _datum(**_rl_inputs(target_tokens=np.zeros((N, 2), np.int64))),
        "target_tokens",
    ),
    ("cross_entropy", "image chunk", _image_datum, "image"),
    (
        "cross_entropy",
        "empty input",
        lambda: _datum(tokens=[], target_tokens=np.zeros(0, np.int64)),
        "model_input",
    ),
]


@pytest.mark.parametrize(("loss_fn", "case", "make", "field"), CASES, ids=[c[1] for c in CASES])
def test_bad_datum_names_index_and_field_and_accumulates_nothing(
    engine: TorchEngine, loss_fn: str, case: str, make: Callable[[], tinker.Datum], field: str
) -> None:
    m = full_model(engine, "m")
    good = GOOD if loss_fn == "cross_entropy" else _datum(**_rl_inputs())
    engine.forward_backward(m, [good], loss_fn, None)
    before, counts = grads(engine, m), engine.window_counts(m)
    with pytest.raises(UserError) as info:
        engine.forward_backward(m, [good, make(), good], loss_fn, None)
    assert "datum 1" in str(info.value) and field in str(info.value)
    after = grads(engine, m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.window_counts(m) == counts
    with pytest.raises(UserError, match="datum 1"):
        engine.forward(m, [good, make()], loss_fn, None)


def test_request_level_errors(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    with pytest.raises(UserError, match="unknown loss_fn 'mse'"):
        engine.forward_backward(m, [GOOD], "mse", None)
    with pytest.raises(UserError, match="clip_low_threshold"):
        engine.forward_backward(m, [_datum(**_rl_inputs())], "ppo", {"clip_low_threshold": "0.8"})
    with pytest.raises(UserError, match="clip"):
        engine.forward_backward(
            m,
            [_datum(**_rl_inputs())],
            "ppo",
            {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2},
        )
    with pytest.raises(UserError, match="target_logprob_support"):
        engine.forward(m, [GOOD], "cross_entropy", {"target_logprob_support": "candidates"})
    with pytest.raises(UserError, match="unknown model_id"):
        engine.forward("nope", [GOOD], "cross_entropy", None)
    assert engine.window_counts(m) == (0, 0)


def test_non_finite_loss_is_reported_before_backward(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    # finite inputs whose ratio exp(lp - q) overflows float32
    bad = _datum(**_rl_inputs(logprobs=np.full(N, -1e4, np.float32)))
    with pytest.raises(UserError, match="datum 1: the loss is not finite"):
        engine.forward_backward(m, [_datum(**_rl_inputs()), bad], "importance_sampling", None)
    assert all(g.count_nonzero() == 0 for g in grads(engine, m).values())
    assert engine.window_counts(m) == (0, 0)
