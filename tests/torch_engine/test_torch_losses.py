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
}


def _rl_data(engine: TorchEngine, model_id: str, *, with_weights: bool) -> list[tinker.Datum]:
    """Sampler logprobs near the model's own (ratios around the clip bounds), advantages
    with zeros, optional real-valued weights."""
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
    export_dir: Path, data: list[tinker.Datum], loss_fn: str, cfg: dict[str, float]
) -> tuple[dict[str, torch.Tensor], float]:
    model = load_hf(export_dir)
    total = torch.zeros(())
    for d in data:
        inputs = {
            k: v.to_torch().float() for k, v in d.loss_fn_inputs.items() if k != "target_tokens"
        }
        total = total + FORMULAS[loss_fn](ref_logprobs(model, d), inputs, cfg)
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
    ref, ref_loss = _reference_grads(export(engine, m, tmp_path / "e"), data, loss_fn, cfg)
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
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        out = engine.forward_backward(m, [datum], loss_fn, None)
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
