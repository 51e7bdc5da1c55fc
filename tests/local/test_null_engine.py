"""NullEngine on its own: shapes, the loss formulas, validation messages, checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tinker
from shared import sample_request

from firetitan.local.engine import ModelSpec, SampleSource, UserError
from firetitan.local.null_engine import NullEngine

MODEL = "m-1"
TARGETS = "datum 0: loss_fn_inputs['target_tokens']"


def datum(
    tokens: list[int], targets: list[int] | None = None, **inputs: list[float]
) -> tinker.Datum:
    loss_inputs: dict[str, tinker.TensorData] = {
        "target_tokens": tinker.TensorData.from_numpy(
            np.asarray(targets if targets is not None else tokens, dtype=np.int64)
        )
    }
    for name, values in inputs.items():
        loss_inputs[name] = tinker.TensorData.from_numpy(np.asarray(values, dtype=np.float32))
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens), loss_fn_inputs=loss_inputs)


@pytest.fixture
def engine() -> NullEngine:
    e = NullEngine(seed=3)
    e.create_model(MODEL, ModelSpec(base_model="base"))
    return e


def test_forward_shapes_and_cross_entropy_loss(engine: NullEngine) -> None:
    data = [datum([1, 2, 3], weights=[0.0, 1.0, 2.0]), datum([4, 5], weights=[-1.0, 0.5])]
    out = engine.forward(MODEL, data, "cross_entropy", None)
    assert len(out.loss_fn_outputs) == 2
    expected = 0.0
    for d, o in zip(data, out.loss_fn_outputs, strict=True):
        lp = o["logprobs"].to_numpy()
        assert lp.dtype == np.float32
        assert lp.shape == d.loss_fn_inputs["target_tokens"].to_numpy().shape
        assert (lp <= 0).all()
        expected += float(-(d.loss_fn_inputs["weights"].to_numpy() * lp.astype(np.float64)).sum())
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-12)
    # Deterministic: the same request gives the same values.
    again = engine.forward(MODEL, data, "cross_entropy", None)
    assert np.array_equal(
        again.loss_fn_outputs[0]["logprobs"].to_numpy(),
        out.loss_fn_outputs[0]["logprobs"].to_numpy(),
    )


def test_weights_default_to_ones(engine: NullEngine) -> None:
    out = engine.forward(MODEL, [datum([7, 8, 9])], "cross_entropy", None)
    lp = out.loss_fn_outputs[0]["logprobs"].to_numpy().astype(np.float64)
    assert out.metrics["loss:sum"] == pytest.approx(float(-lp.sum()))


def test_ppo_uses_the_formula(engine: NullEngine) -> None:
    q = [-1.0, -0.5, -2.0]
    adv = [1.0, -1.0, 0.5]
    d = datum([1, 2, 3], logprobs=q, advantages=adv)
    out = engine.forward(MODEL, [d], "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    lp = out.loss_fn_outputs[0]["logprobs"].to_numpy().astype(np.float64)
    ratio = np.exp(lp - np.asarray(q))
    a = np.asarray(adv)
    expected = -np.minimum(ratio * a, np.clip(ratio, 0.9, 1.1) * a).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected))


def test_gspo_uses_the_formula(engine: NullEngine) -> None:
    q = [-9.0, -0.5, -2.0, -1.0]
    adv = [0.0, 1.0, -1.0, 0.0]
    mask = [0.0, 1.0, 1.0, 1.0]
    d = datum([1, 2, 3, 4], logprobs=q, advantages=adv, sequence_ratio_mask=mask)
    out = engine.forward(MODEL, [d], "gspo", None)
    lp = out.loss_fn_outputs[0]["logprobs"].to_numpy().astype(np.float64)
    s = np.exp(np.mean(lp[1:] - np.asarray(q[1:])))  # position 0 is outside the ratio
    a = np.asarray(adv)
    expected = -np.minimum(s * a, np.clip(s, 0.8, 1.2) * a).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected))
    assert out.metrics["loss_tokens:sum"] == 2.0


def test_optim_step_changes_outputs_and_counts(engine: NullEngine) -> None:
    d = datum([1, 2, 3], weights=[1.0, 0.0, 1.0])
    before = engine.forward(MODEL, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
    engine.forward_backward(MODEL, [d], "cross_entropy", None)
    metrics = engine.optim_step(MODEL, tinker.AdamParams(learning_rate=1e-3), "num_loss_tokens")
    assert metrics == {
        "optim_step:max": 1.0,
        "learning_rate:unique": 1e-3,
        "loss_tokens:sum": 2.0,
        "sequences:sum": 1.0,
    }
    after = engine.forward(MODEL, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
    assert not np.array_equal(before.to_numpy(), after.to_numpy())


@pytest.mark.parametrize(
    ("data", "loss_fn", "message"),
    [
        ([datum([1, 2])], "nope", "unknown loss_fn 'nope'"),
        ([datum([1, 2], targets=[1, 2, 3])], "cross_entropy", TARGETS),
        ([datum([1, 2]), datum([1, 999])], "cross_entropy", "datum 1: model_input holds"),
        ([datum([1, 2], targets=[1, 600])], "cross_entropy", TARGETS),
        ([datum([1, 2])], "ppo", "datum 0: loss_fn_inputs is missing 'logprobs', 'advantages'"),
        ([datum([1, 2], weights=[1.0])], "cross_entropy", "datum 0: loss_fn_inputs['weights']"),
    ],
)
def test_validation_names_datum_and_field(
    engine: NullEngine, data: list[tinker.Datum], loss_fn: str, message: str
) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        engine.forward_backward(MODEL, data, loss_fn, None)
    # Nothing was accumulated by the failed request.
    metrics = engine.optim_step(MODEL, tinker.AdamParams(), None)
    assert metrics["loss_tokens:sum"] == 0.0


def test_missing_target_tokens() -> None:
    engine = NullEngine()
    engine.create_model(MODEL, ModelSpec(base_model="b"))
    d = tinker.Datum(model_input=tinker.ModelInput.from_ints([1, 2]), loss_fn_inputs={})
    with pytest.raises(UserError, match="datum 0: loss_fn_inputs is missing 'target_tokens'"):
        engine.forward(MODEL, [d], "cross_entropy", None)


def test_state_round_trip(engine: NullEngine, tmp_path: Path) -> None:
    d = datum([1, 2, 3])
    engine.forward_backward(MODEL, [d], "cross_entropy", None)
    engine.optim_step(MODEL, tinker.AdamParams(), None)
    engine.save_state(MODEL, tmp_path)
    saved = engine.forward(MODEL, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
    engine.optim_step(MODEL, tinker.AdamParams(), None)
    engine.load_state(MODEL, tmp_path, with_optimizer=True)
    loaded = engine.forward(MODEL, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
    assert np.array_equal(saved.to_numpy(), loaded.to_numpy())
    other = NullEngine()
    other.create_model("x", ModelSpec(base_model="other"))
    with pytest.raises(UserError, match="base model"):
        other.load_state("x", tmp_path, with_optimizer=False)


def test_sampler_export_and_sampling(engine: NullEngine, tmp_path: Path) -> None:
    engine.save_for_sampler(MODEL, tmp_path, "base", None)
    params = tinker.SamplingParams(max_tokens=5, seed=1)
    source = SampleSource(export_dir=tmp_path)
    first = engine.sample(source, sample_request([1, 2], 2, params, prompt_logprobs=True))
    second = engine.sample(source, sample_request([1, 2], 2, params))
    assert len(first.sequences) == 2
    for a, b in zip(first.sequences, second.sequences, strict=True):
        assert a.tokens == b.tokens
        assert len(a.tokens) <= 5
        assert a.logprobs is not None and all(lp <= 0 for lp in a.logprobs)
    assert first.prompt_logprobs is not None and first.prompt_logprobs[0] is None
    with pytest.raises(UserError, match="delta export needs a previous export"):
        engine.save_for_sampler(MODEL, tmp_path, "delta", None)
