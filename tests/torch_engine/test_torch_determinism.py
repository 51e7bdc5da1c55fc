"""Two runs with the same seed, data and calls end bit-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tinker
import torch
from shared import sample_request

from firetitan.local.engine import SampleSource
from firetitan.local.torch import TorchEngine

from .helpers import QWEN, TOK, bit_equal, full_model, lora_model, sft_batch, weights


def _run(root: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[object]]:
    engine = TorchEngine(device="cpu", seed=3, threads=2)
    models = [full_model(engine, "full"), lora_model(engine, "lora", rank=4)]
    outputs: list[object] = []
    for step in range(2):
        for m in models:
            fb = engine.forward_backward(m, sft_batch(), "cross_entropy", None)
            lp = fb.loss_fn_outputs[0]["logprobs"].to_numpy()
            n = lp.shape[0]
            rl = tinker.Datum(
                model_input=sft_batch()[0].model_input,
                loss_fn_inputs={
                    "target_tokens": sft_batch()[0].loss_fn_inputs["target_tokens"],
                    "logprobs": (lp - 0.1).astype(np.float32),
                    "advantages": np.linspace(-1, 1, n).astype(np.float32),
                },
            )
            ppo = engine.forward_backward(m, [rl], "ppo", None)
            opt = engine.optim_step(
                m,
                tinker.AdamParams(learning_rate=1e-3 * (step + 1), grad_clip_norm=1.0),
                "num_loss_tokens",
            )
            outputs += [fb.metrics, ppo.metrics, opt, lp.tolist()]
    sample = engine.sample(
        SampleSource(model_id="full"),
        sample_request(
            TOK.encode("x", add_bos=True), 2, tinker.SamplingParams(max_tokens=5, stop=[])
        ),
    )
    outputs.append([s.tokens for s in sample.sequences])
    (root / "ckpt").mkdir(parents=True)
    engine.save_state("lora", root / "ckpt")
    return {m: weights(engine, m) for m in models}, outputs


def test_identical_runs_are_bit_identical(tmp_path: Path) -> None:
    # Several intra-op threads, as larger models run by default: reductions split across
    # threads must still be reproducible.
    torch.set_num_threads(2)
    w1, out1 = _run(tmp_path / "a")
    w2, out2 = _run(tmp_path / "b")
    assert out1 == out2
    for m in w1:
        assert bit_equal(w1[m], w2[m])
    for f in (tmp_path / "a" / "ckpt").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "ckpt" / f.name).read_bytes()


def test_stand_in_weights_depend_on_seed_and_name() -> None:
    a = weights(e := TorchEngine(device="cpu", seed=0), full_model(e, "m"))
    b = weights(e2 := TorchEngine(device="cpu", seed=0), full_model(e2, "m"))
    c = weights(e3 := TorchEngine(device="cpu", seed=1), full_model(e3, "m"))
    d = weights(e, full_model(e, "other", base=QWEN.replace("8b", "4b")))
    assert bit_equal(a, b)
    assert not bit_equal(a, c) and not bit_equal(a, d)
