"""The CUDA path (bf16 autocast, float32 master weights); runs only where CUDA exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinker
import torch
from shared import sample_request

from firetitan.local.engine import SampleSource
from firetitan.local.torch import TorchEngine

from .helpers import QWEN, TOK, bit_equal, full_model, lora_model, sft_batch, weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train(tmp: Path) -> tuple[TorchEngine, dict[str, dict[str, torch.Tensor]], list[object]]:
    engine = TorchEngine(device="cuda", seed=0, deterministic=True)
    models = [full_model(engine, "full"), lora_model(engine, "lora")]
    outs: list[object] = []
    for m in models:
        for _ in range(3):
            fb = engine.forward_backward(m, sft_batch(), "cross_entropy", None)
            opt = engine.optim_step(m, tinker.AdamParams(learning_rate=1e-3), "num_loss_tokens")
            outs += [fb.metrics, opt]
        (tmp / m).mkdir(parents=True)
        engine.save_for_sampler(m, tmp / m, "base", None)
    res = engine.sample(
        SampleSource(export_dir=tmp / "lora"),
        sample_request(
            TOK.encode("x", add_bos=True),
            4,
            tinker.SamplingParams(max_tokens=8, seed=1, top_p=0.9, top_k=50, stop=[]),
        ),
    )
    outs.append([s.tokens for s in res.sequences])
    return engine, {m: weights(engine, m) for m in models}, outs


def test_cuda_training_is_deterministic_and_keeps_float32_weights(tmp_path: Path) -> None:
    engine, w1, out1 = _train(tmp_path / "a")
    _, w2, out2 = _train(tmp_path / "b")
    assert out1 == out2
    assert all(bit_equal(w1[m], w2[m]) for m in w1)
    p = next(engine.module("full").parameters())
    assert p.device.type == "cuda" and p.dtype == torch.float32
    lp = engine.forward("full", sft_batch(), "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
    assert lp.dtype == "float32"
    res = engine.sample(
        SampleSource(base_model=QWEN),
        sample_request([1, 2, 3], 2, tinker.SamplingParams(max_tokens=4, temperature=0.0)),
    )
    assert len(res.sequences) == 2
