"""forward: log-probabilities against a direct transformers computation, padding, outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tinker
import torch

from firetitan.local.torch import TorchEngine

from .helpers import (
    LLAMA,
    TOK,
    export,
    full_model,
    grads,
    load_hf,
    ref_logprobs,
    sft_batch,
    sft_datum,
)


def test_forward_matches_transformers_on_exported_weights(
    engine: TorchEngine, tmp_path: Path
) -> None:
    m = full_model(engine, "m")
    data = sft_batch()
    out = engine.forward(m, data, "cross_entropy", None)
    hf = load_hf(export(engine, m, tmp_path / "e"))
    with torch.no_grad():
        for i, d in enumerate(data):
            got = out.loss_fn_outputs[i]["logprobs"]
            assert got.dtype == "float32"
            assert got.shape == [d.model_input.length]
            ref = ref_logprobs(hf, d)
            assert torch.max(torch.abs(got.to_torch() - ref)).item() <= 1e-5
        expected_loss = -sum(float(ref_logprobs(hf, d).sum()) for d in data)
    assert abs(out.metrics["loss:sum"] - expected_loss) <= 1e-4 * abs(expected_loss)


def test_llama_family_stand_in(engine: TorchEngine, tmp_path: Path) -> None:
    m = full_model(engine, "m", base=LLAMA)
    assert engine.get_info(m)["model_data"]["arch"] == "LlamaForCausalLM"
    data = sft_batch()[:2]
    out = engine.forward(m, data, "cross_entropy", None)
    hf = load_hf(export(engine, m, tmp_path / "e"))
    with torch.no_grad():
        for i, d in enumerate(data):
            ref = ref_logprobs(hf, d)
            assert torch.max(torch.abs(out.loss_fn_outputs[i]["logprobs"].to_torch() - ref)) <= 1e-5


def test_padding_does_not_change_logprobs(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    data = sft_batch()
    batched = engine.forward(m, data, "cross_entropy", None)
    for i, d in enumerate(data):
        alone = engine.forward(m, [d], "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
        diff = np.abs(alone.to_numpy() - batched.loss_fn_outputs[i]["logprobs"].to_numpy())
        assert diff.max() <= 1e-5


def test_forward_never_touches_gradients(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    engine.forward(m, sft_batch(), "cross_entropy", None)
    assert all(torch.count_nonzero(g) == 0 for g in grads(engine, m).values())
    assert engine.window_counts(m) == (0, 0)


def test_top_k_targets_give_n_by_k_logprobs(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    ids = TOK.encode("top k targets", add_bos=True)
    n, k = len(ids), 3
    targets = np.random.default_rng(0).integers(0, 256, size=(n, k))
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(ids),
        loss_fn_inputs={"target_tokens": targets, "weights": np.ones((n, k), np.float32)},
    )
    out = engine.forward(m, [datum, sft_datum("plain")], "cross_entropy", None)
    assert out.loss_fn_outputs[0]["logprobs"].shape == [n, k]
    assert out.loss_fn_outputs[1]["logprobs"].shape == [len(TOK.encode("plain")) + 1]


def test_metric_keys_have_one_colon(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    out = engine.forward_backward(m, sft_batch(), "cross_entropy", None)
    assert out.metrics and all(key.count(":") == 1 for key in out.metrics)
    assert out.loss_fn_output_type
