"""save_state / load_state: exact resume, weights-only loads, mismatches, safe formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinker

from firetitan.local.engine import ModelSpec, UserError
from firetitan.local.torch import TorchEngine

from .helpers import QWEN, bit_equal, full_model, grads, lora_model, sft_batch, sft_datum, weights

ADAM = tinker.AdamParams(learning_rate=2e-3, weight_decay=0.01, grad_clip_norm=1.0)


def _step(engine: TorchEngine, model_id: str, i: int) -> None:
    data = [sft_datum(f"step {i} text"), *sft_batch()[i % 2 :: 2]]
    engine.forward_backward(model_id, data, "cross_entropy", None)
    engine.optim_step(model_id, ADAM, "num_loss_tokens")


def _save(engine: TorchEngine, model_id: str, directory: Path) -> Path:
    directory.mkdir(parents=True)
    engine.save_state(model_id, directory)
    return directory


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_with_optimizer_replays_bit_identically(tmp_path: Path, lora: bool) -> None:
    k, n = 2, 4
    first = TorchEngine(device="cpu")
    m = lora_model(first, "m") if lora else full_model(first, "m")
    for i in range(k):
        _step(first, m, i)
    at_k = weights(first, m)
    ckpt = _save(first, m, tmp_path / "s")
    for i in range(k, n):
        _step(first, m, i)
    final = weights(first, m)

    second = TorchEngine(device="cpu")
    m2 = lora_model(second, "other") if lora else full_model(second, "other")
    second.load_state(m2, ckpt, with_optimizer=True)
    assert bit_equal(weights(second, m2), at_k)
    for i in range(k, n):
        _step(second, m2, i)
    assert bit_equal(weights(second, m2), final)


def test_weights_only_load_restarts_the_optimizer(tmp_path: Path) -> None:
    first = TorchEngine(device="cpu")
    m = full_model(first, "m")
    for i in range(2):
        _step(first, m, i)
    ckpt = _save(first, m, tmp_path / "s")
    _step(first, m, 2)

    second = TorchEngine(device="cpu")
    m2 = full_model(second, "m")
    _step(second, m2, 0)  # some optimizer state that the load must discard
    second.load_state(m2, ckpt, with_optimizer=False)
    _step(second, m2, 2)
    assert not bit_equal(weights(second, m2), weights(first, m))

    third = TorchEngine(device="cpu")
    m3 = full_model(third, "m")
    third.load_state(m3, ckpt, with_optimizer=False)
    _step(third, m3, 2)  # a fresh optimizer behaves the same wherever it comes from
    assert bit_equal(weights(second, m2), weights(third, m3))


def test_mid_window_save_restores_gradient_and_counters(tmp_path: Path) -> None:
    first = TorchEngine(device="cpu")
    m = full_model(first, "m")
    _step(first, m, 0)
    first.forward_backward(m, sft_batch(), "cross_entropy", None)
    counts = first.window_counts(m)
    ckpt = _save(first, m, tmp_path / "s")
    first.optim_step(m, ADAM, "num_sequences")

    second = TorchEngine(device="cpu")
    m2 = full_model(second, "m")
    second.load_state(m2, ckpt, with_optimizer=True)
    assert second.window_counts(m2) == counts
    second.optim_step(m2, ADAM, "num_sequences")
    assert bit_equal(weights(second, m2), weights(first, m))

    third = TorchEngine(device="cpu")
    m3 = full_model(third, "m")
    third.load_state(m3, ckpt, with_optimizer=False)
    assert third.window_counts(m3) == (0, 0)
    assert all(g.count_nonzero() == 0 for g in grads(third, m3).values())


def test_checkpoint_files_are_safetensors_and_json_and_reproducible(tmp_path: Path) -> None:
    dirs = []
    for run in range(2):
        engine = TorchEngine(device="cpu")
        m = lora_model(engine, "m")
        _step(engine, m, 0)
        dirs.append(_save(engine, m, tmp_path / f"run{run}"))
    files = sorted(p.name for p in dirs[0].iterdir())
    assert all(name.endswith((".safetensors", ".json")) for name in files), files
    for name in files:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name
    index = json.loads((dirs[0] / "model.safetensors.index.json").read_text())
    assert "weight_map" in index


def test_mismatched_checkpoints_are_user_errors(engine: TorchEngine, tmp_path: Path) -> None:
    full = full_model(engine, "full")
    lora4 = lora_model(engine, "lora4", rank=4)
    lora8 = lora_model(engine, "lora8", rank=8)
    engine.create_model("llama", ModelSpec(base_model="llama-3", lora_rank=4, lora_alpha=32))
    full_ckpt = _save(engine, full, tmp_path / "full")
    lora_ckpt = _save(engine, lora4, tmp_path / "lora")
    before = weights(engine, lora8)
    with pytest.raises(UserError, match="full-parameter"):
        engine.load_state(lora8, full_ckpt, with_optimizer=True)
    with pytest.raises(UserError, match="rank"):
        engine.load_state(lora8, lora_ckpt, with_optimizer=False)
    with pytest.raises(UserError, match="LoRA rank 4"):
        engine.load_state(full, lora_ckpt, with_optimizer=False)
    with pytest.raises(UserError, match="architecture"):
        engine.load_state("llama", lora_ckpt, with_optimizer=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a state checkpoint"):
        engine.load_state(lora8, empty, with_optimizer=True)
    assert bit_equal(weights(engine, lora8), before)


def test_lora_checkpoint_of_other_base_weights_is_rejected(tmp_path: Path) -> None:
    seed0, seed1 = TorchEngine(device="cpu", seed=0), TorchEngine(device="cpu", seed=1)
    ckpt = _save(seed1, lora_model(seed1, "m"), tmp_path / "s")
    m = lora_model(seed0, "m")  # same shapes, other stand-in base weights
    with pytest.raises(UserError, match="base weights"):
        seed0.load_state(m, ckpt, with_optimizer=True)


def test_base_only_models_have_no_training_state(engine: TorchEngine, tmp_path: Path) -> None:
    engine.create_model("ref", ModelSpec(base_model=QWEN, base_only=True))
    with pytest.raises(UserError, match="base-only"):
        engine.save_state("ref", tmp_path)
