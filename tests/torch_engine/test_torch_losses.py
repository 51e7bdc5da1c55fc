"""Each built-in loss accumulates exactly the autograd gradient of the formula in losses.md."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch

from firetitan.local.engine import UserError
from firetitan.local.torch import TorchEngine

from .helpers import TOK, export, full_model, grads, load_hf, ref_logprobs, rel_error, sft_datum

Formula = Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, float]], torch.Tensor]


def _ce(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    w = x.get("weights", torch.ones_like(lp))
    return -(w * lp).sum()


def _rl(term: Callable[..., torch.Tensor]) -> Formula:
    def loss(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
        q, a = x["logprobs"], x["advantages"]
        coef = x.get("weights", torch.ones_like(lp)) * (a != 0)
        return -(coef * term(lp, q, a, cfg)).sum()

    return loss


def _ratio(lp: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.exp(lp - q)


def _clip(c: dict[str, float]) -> tuple[float, float]:
    return c.get("clip_low_threshold", 0.8), c.get("clip_high_threshold", 1.2)


def _gspo(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """GSPO-token as tinker documents it: each position carries the value of the sequence
    ratio over the marked positions and the gradient of its own log-probability."""
    q, a, marked = x["logprobs"], x["advantages"], x["sequence_ratio_mask"] != 0
    coef = x.get("weights", torch.ones_like(lp)) * (a != 0)
    s = torch.exp((lp.detach() - q)[marked].mean())
    s_t = s * torch.exp(lp - lp.detach())
    lo, hi = _clip(cfg)
    return -(coef * torch.minimum(s_t * a, torch.clamp(s_t, lo, hi) * a)).sum()


def _gspo_sequence(
    lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]
) -> torch.Tensor:
    """The sequence-level GSPO objective, the gradient flowing through the sequence ratio
    into every marked log-probability; one advantage per sequence."""
    q, a, marked = x["logprobs"], x["advantages"], x["sequence_ratio_mask"] != 0
    s = torch.exp((lp - q)[marked].mean())
    adv = a[marked][0]
    lo, hi = _clip(cfg)
    return -int(marked.sum()) * torch.minimum(s * adv, torch.clamp(s, lo, hi) * adv)


FORMULAS: dict[str, Formula] = {
    "cross_entropy": _ce,
    "importance_sampling": _rl(lambda lp, q, a, c: _ratio(lp, q) * a),
    "ppo": _rl(
        lambda lp, q, a, c: torch.minimum(
            _ratio(lp, q) * a,
            torch.clamp(
                _ratio(lp, q), c.get("clip_low_threshold", 0.8), c.get("clip_high_threshold", 1.2)
            )
            * a,
        )
    ),
    "cispo": _rl(
        lambda lp, q, a, c: (
            torch.clamp(
                _ratio(lp, q), c.get("clip_low_threshold", 0.8), c.get("clip_high_threshold", 1.2)
            ).detach()
            * lp
            * a
        )
    ),
    "dro": _rl(lambda lp, q, a, c: lp * a - 0.5 * c.get("beta", 0.05) * (lp - q) ** 2),
    "gspo": _gspo,
}


def _rl_data(engine: TorchEngine, model_id: str, *, with_weights: bool) -> list[tinker.Datum]:
    """Sampler logprobs near the model's own (ratios around the clip bounds), advantages
    with zeros, optional real-valued weights; a ``sequence_ratio_mask`` (for ``gspo``,
    ignored by the others) marking all but the first third of the positions."""
    rng = np.random.default_rng(1)
    base = [sft_datum(t) for t in ("reinforce this text", "rollout two", "x y z w")]
    fwd = engine.forward(model_id, base, "cross_entropy", None)
    out = []
    for d, o in zip(base, fwd.loss_fn_outputs, strict=True):
        lp = o["logprobs"].to_numpy()
        n = lp.shape[0]
        adv = rng.normal(size=n).astype(np.float32)
        adv[rng.random(n) < 0.3] = 0.0
        inputs = {
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": (lp + rng.uniform(-0.5, 0.5, size=n)).astype(np.float32),
            "advantages": adv,
            "sequence_ratio_mask": (np.arange(n) >= n // 3).astype(np.float32),
        }
        if with_weights:
            w = rng.uniform(0.2, 2.0, size=n).astype(np.float32)
            w[rng.random(n) < 0.3] = 0.0
            inputs["weights"] = w
        out.append(tinker.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return out


def _ce_data() -> list[tinker.Datum]:
    rng = np.random.default_rng(2)
    signed = sft_datum("signed weights", rng.normal(size=15).astype(np.float32).tolist())
    ids = TOK.encode("top-k form", add_bos=True)
    n, k = len(ids), 4
    top_k = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(ids),
        loss_fn_inputs={
            "target_tokens": rng.integers(0, 264, size=(n, k)),
            "weights": rng.normal(size=(n, k)).astype(np.float32),
        },
    )
    return [sft_datum("no weights at all"), signed, top_k]


def _reference_grads(
    export_dir: Path, data: list[tinker.Datum], formula: Formula, cfg: dict[str, float]
) -> tuple[dict[str, torch.Tensor], float]:
    model = load_hf(export_dir)
    total = torch.zeros(())
    for d in data:
        inputs = {
            k: v.to_torch().float() for k, v in d.loss_fn_inputs.items() if k != "target_tokens"
        }
        total = total + formula(ref_logprobs(model, d), inputs, cfg)
    total.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, float(
        total.detach()
    )


CASES = [
    ("cross_entropy", False, {}),
    ("importance_sampling", False, {}),
    ("importance_sampling", True, {}),
    ("ppo", False, {}),
    ("ppo", True, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", False, {}),
    ("cispo", True, {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}),
    ("dro", False, {}),
    ("dro", True, {"beta": 0.3}),
    ("gspo", False, {}),
    ("gspo", True, {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
]


@pytest.mark.parametrize(("loss_fn", "with_weights", "cfg"), CASES)
def test_gradient_equals_autograd_of_the_spec_formula(
    engine: TorchEngine, tmp_path: Path, loss_fn: str, with_weights: bool, cfg: dict[str, float]
) -> None:
    m = full_model(engine, "m")
    if loss_fn == "cross_entropy":
        data = _ce_data()
    else:
        data = _rl_data(engine, m, with_weights=with_weights)
    ref, ref_loss = _reference_grads(
        export(engine, m, tmp_path / "e"), data, FORMULAS[loss_fn], cfg
    )
    out = engine.forward_backward(m, data, loss_fn, cfg or None)
    got = grads(engine, m)
    assert rel_error(got, ref) <= 1e-5
    assert abs(out.metrics["loss:sum"] - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    for d, o in zip(data, out.loss_fn_outputs, strict=True):
        assert o["logprobs"].shape == d.loss_fn_inputs["target_tokens"].shape


def test_accumulation_is_a_plain_sum(engine: TorchEngine) -> None:
    a, b = full_model(engine, "a"), full_model(engine, "b")
    data = [sft_datum(t) for t in ("first call", "second call here")]
    engine.forward_backward(a, data[:1], "cross_entropy", None)
    engine.forward_backward(a, data[1:], "cross_entropy", None)
    engine.forward_backward(b, data, "cross_entropy", None)
    assert rel_error(grads(engine, a), grads(engine, b)) <= 1e-6
    assert engine.window_counts(a) == engine.window_counts(b)


def test_zero_advantage_positions_carry_no_gradient(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    d = sft_datum("no signal")
    n = d.model_input.length
    datum = tinker.Datum(
        model_input=d.model_input,
        loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            # wildly off sampler logprobs: masked positions must not turn them into inf/nan
            "logprobs": np.full(n, -1e4, np.float32),
            "advantages": np.zeros(n, np.float32),
        },
    )
    gspo = tinker.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={**datum.loss_fn_inputs, "sequence_ratio_mask": np.ones(n, np.float32)},
    )
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro", "gspo"):
        out = engine.forward_backward(m, [datum, gspo], loss_fn, None)
        assert out.metrics["loss:sum"] == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(engine, m).values())
    assert engine.window_counts(m) == (0, 0)


def test_micro_batches_accumulate_like_one_batch(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from firetitan.local.torch import engine as engine_module

    a, b = full_model(engine, "a"), full_model(engine, "b")
    data = [sft_datum(t) for t in ("one sequence", "another one", "and a third")]
    whole = engine.forward_backward(a, data, "cross_entropy", None)
    monkeypatch.setattr(engine_module, "MAX_LOGIT_CELLS", 264 * 16)  # one datum per pass
    split = engine.forward_backward(b, data, "cross_entropy", None)
    assert rel_error(grads(engine, b), grads(engine, a)) <= 1e-6
    for x, y in zip(whole.loss_fn_outputs, split.loss_fn_outputs, strict=True):
        assert torch.allclose(x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-5)

    # a failure in a later pass restores the gradient accumulated before the request
    before = grads(engine, b)
    bad = tinker.Datum(
        model_input=data[0].model_input,
        loss_fn_inputs={
            "target_tokens": data[0].loss_fn_inputs["target_tokens"],
            "logprobs": np.full(data[0].model_input.length, -1e4, np.float32),
            "advantages": np.ones(data[0].model_input.length, np.float32),
        },
    )
    good = tinker.Datum(
        model_input=bad.model_input,
        loss_fn_inputs={
            **bad.loss_fn_inputs,
            "logprobs": np.zeros(bad.model_input.length, np.float32),
        },
    )
    with pytest.raises(UserError, match="datum 1"):
        engine.forward_backward(b, [good, bad], "importance_sampling", None)
    assert all(torch.equal(before[k], v) for k, v in grads(engine, b).items())


def _gspo_datum(
    d: tinker.Datum, q: np.ndarray, adv: list[float], mask: list[float]
) -> tinker.Datum:
    return tinker.Datum(
        model_input=d.model_input,
        loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": np.asarray(q, np.float32),
            "advantages": np.asarray(adv, np.float32),
            "sequence_ratio_mask": np.asarray(mask, np.float32),
        },
    )


def test_gspo_matches_a_hand_computed_case(engine: TorchEngine) -> None:
    """Five positions; the mask marks the last three, whose lp - q are 0.2, 0.4, 0.9:
    s = e^0.5 ≈ 1.649, above the default bound 1.2. The A = +1 position takes the
    clipped branch (constant 1.2, no gradient), the A = -2 one the unclipped branch
    (-2s, gradient 2s·∇lp), the marked A = 0 one nothing: loss 2s - 1.2."""
    a, b = full_model(engine, "a"), full_model(engine, "b")
    d = sft_datum("gspo")
    assert d.model_input.length == 5
    lp = engine.forward(a, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"].to_numpy()
    q = lp - np.asarray([9.0, -9.0, 0.2, 0.4, 0.9], np.float32)  # unmarked: any value
    datum = _gspo_datum(d, q, [0, 0, 1, -2, 0], [0, 0, 1, 1, 1])
    out = engine.forward_backward(a, [datum], "gspo", None)
    s = float(np.exp(0.5))
    assert out.metrics["loss:sum"] == pytest.approx(2 * s - 1.2, rel=1e-5)
    assert out.metrics["loss_tokens:sum"] == 2.0
    # the same gradient from cross_entropy: -Σ w·lp with w = -2s at position 3 only
    weights = np.asarray([0, 0, 0, -2 * s, 0], np.float32)
    engine.forward_backward(b, [sft_datum("gspo", weights.tolist())], "cross_entropy", None)
    got = grads(engine, a)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert rel_error(got, grads(engine, b)) <= 1e-5


def test_gspo_gradient_is_the_sequence_level_one_with_one_advantage_per_sequence(
    engine: TorchEngine, tmp_path: Path
) -> None:
    """With one advantage per sequence on exactly the marked positions (the cookbook's
    data), the per-token form accumulates the gradient of the sequence-level objective,
    where the gradient flows through the sequence ratio into every marked lp."""
    m = full_model(engine, "m")
    data = []
    for d, adv in zip(_rl_data(engine, m, with_weights=False), (1.0, -0.7, 0.4), strict=True):
        mask = d.loss_fn_inputs["sequence_ratio_mask"].to_numpy()
        inputs = {**d.loss_fn_inputs, "advantages": (mask * adv).astype(np.float32)}
        data.append(tinker.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    ref, ref_loss = _reference_grads(export(engine, m, tmp_path / "e"), data, _gspo_sequence, {})
    out = engine.forward_backward(m, data, "gspo", None)
    assert rel_error(grads(engine, m), ref) <= 1e-5
    assert out.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-4, abs=1e-4)


def test_gspo_unmarked_positions_stay_out_of_the_ratio(engine: TorchEngine) -> None:
    """Sampler logprobs where the mask is 0 (and A = 0, as on a prompt) change nothing,
    even absurd ones; marking one more position changes the ratio."""
    a, b, c = (full_model(engine, x) for x in "abc")
    d = sft_datum("mask me")
    n = d.model_input.length
    lp = engine.forward(a, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"].to_numpy()
    mask = [0.0] * 3 + [1.0] * (n - 3)
    adv = [0.0] * 3 + [0.5] * (n - 3)
    q = lp - 0.05
    wild = q.copy()
    wild[:3] = -1e4
    first = engine.forward_backward(a, [_gspo_datum(d, q, adv, mask)], "gspo", None)
    second = engine.forward_backward(b, [_gspo_datum(d, wild, adv, mask)], "gspo", None)
    assert first.metrics == second.metrics
    assert all(torch.equal(grads(engine, a)[k], g) for k, g in grads(engine, b).items())
    q[0] = lp[0] - 1.0
    wider = engine.forward_backward(c, [_gspo_datum(d, q, adv, [1.0, *mask[1:]])], "gspo", None)
    assert wider.metrics["loss:sum"] != first.metrics["loss:sum"]


@pytest.mark.parametrize("loss_fn", ["ppo", "gspo"])
def test_a_ratio_overflowing_on_the_clipped_side_is_finite_without_gradient(
    engine: TorchEngine, loss_fn: str
) -> None:
    """With A > 0 the minimum takes the clipped branch, ``hi · A``, however large the
    ratio: the loss is finite (as the null engine computes it) and carries no gradient."""
    m = full_model(engine, "m")
    d = sft_datum("far off policy")
    n = d.model_input.length
    q = np.full(n, -1e4, np.float32)
    datum = _gspo_datum(d, q, [1.0] * n, [1.0] * n)
    out = engine.forward_backward(m, [datum], loss_fn, None)
    assert out.metrics["loss:sum"] == pytest.approx(-1.2 * n)
    assert all(torch.count_nonzero(g) == 0 for g in grads(engine, m).values())


def test_gspo_without_a_mask_averages_over_the_loss_tokens(engine: TorchEngine) -> None:
    """tinker-cookbook's ``rl.train`` sends no ``sequence_ratio_mask``: the ratio then
    covers the positions that carry the loss (A ≠ 0, and w ≠ 0 when weights are given)."""
    a, b = full_model(engine, "a"), full_model(engine, "b")
    data = _rl_data(engine, a, with_weights=True)
    marked, bare = [], []
    for d in data:
        inputs = dict(d.loss_fn_inputs)
        del inputs["sequence_ratio_mask"]
        bare.append(tinker.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
        carries = (inputs["advantages"].to_numpy() != 0) & (inputs["weights"].to_numpy() != 0)
        inputs = {**inputs, "sequence_ratio_mask": carries.astype(np.float32)}
        marked.append(tinker.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    with_mask = engine.forward_backward(a, marked, "gspo", None)
    without = engine.forward_backward(b, bare, "gspo", None)
    assert with_mask.metrics == without.metrics
    assert all(torch.equal(grads(engine, a)[k], g) for k, g in grads(engine, b).items())
