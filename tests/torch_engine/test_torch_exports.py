"""Sampler exports: HF base, arc_v2 (fireworks-delta-compression) delta chains, PEFT
adapters, merged LoRA."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import tinker
import torch
from fireworks_delta_compression import delta_decompress_dict_from_file
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from firetitan.local.engine import UserError
from firetitan.local.torch import TorchEngine, materialize_snapshot, rebuild_snapshot
from firetitan.local.torch.models import unique_state

from .helpers import (
    bit_equal,
    export,
    full_model,
    load_hf,
    lora_model,
    ref_logprobs,
    sft_batch,
    sft_datum,
)

ADAM = tinker.AdamParams(learning_rate=3e-3)


def _train(engine: TorchEngine, model_id: str, text: str) -> None:
    engine.forward_backward(model_id, [sft_datum(text)], "cross_entropy", None)
    engine.optim_step(model_id, ADAM, None)


def _state(engine: TorchEngine, model_id: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unique_state(engine.module(model_id)).items()}


def test_base_export_is_a_hugging_face_checkpoint(engine: TorchEngine, tmp_path: Path) -> None:
    m = full_model(engine, "m")
    _train(engine, m, "make it differ from the base")
    d = tmp_path / "e"
    d.mkdir()
    meta = engine.save_for_sampler(m, d, "base", None)
    assert meta["checkpoint_type"] == "base" and meta["previous"] is None
    assert meta["digest"] and meta["base_model"]
    names = sorted(p.name for p in d.iterdir())
    assert names == ["config.json", "firetitan-export.json", "model.safetensors"]
    assert bit_equal(dict(load_hf(d).state_dict()), _state(engine, m))


def test_delta_chain_rebuilds_every_export_bit_exactly(engine: TorchEngine, tmp_path: Path) -> None:
    m = full_model(engine, "m")
    dirs: list[Path] = []
    expected: list[dict[str, torch.Tensor]] = []
    for i in range(4):
        kind = "base" if i == 0 else "delta"
        dirs.append(export(engine, m, tmp_path / f"snap-{i}", kind, dirs[-1] if dirs else None))
        expected.append(_state(engine, m))
        _train(engine, m, f"training between exports {i}")
    for d, want in zip(dirs, expected, strict=True):
        assert bit_equal(rebuild_snapshot(d), want)
    meta = json.loads((dirs[2] / "firetitan-export.json").read_text())
    assert meta["checkpoint_type"] == "delta" and meta["previous"] == "snap-1"
    assert sorted(p.name for p in dirs[2].iterdir()) == [
        "config.json",
        "delta.safetensors",
        "firetitan-export.json",
    ]
    # the delta is the product's hot-load format: the library alone turns the previous
    # tensors and the file into the new ones, and the metadata says which format it is
    assert meta["compression_format"] == "arc_v2" and meta["checksum_format"] == "alder32"
    applied = delta_decompress_dict_from_file(
        src=dict(expected[1]),
        diff_file=str(dirs[2] / "delta.safetensors"),
        compression_format="arc_v2",
    )
    assert bit_equal(applied, expected[2])
    # each tensor carries the Adler-32 checksum of its new bytes
    with safe_open(str(dirs[2] / "delta.safetensors"), framework="pt") as f:
        checksums = f.metadata()
    name = "model.embed_tokens.weight"
    raw = expected[2][name].contiguous().view(torch.uint8).numpy().tobytes()
    assert checksums[name] == str(zlib.adler32(raw))
    # a standalone HF folder from the end of the chain loads in transformers
    out = materialize_snapshot(dirs[3], tmp_path / "full")
    assert bit_equal(dict(load_hf(out).state_dict()), expected[3])


def test_delta_against_an_export_of_another_engine(tmp_path: Path) -> None:
    """The in-memory reference is a cache: without it the previous export is rebuilt."""
    first = TorchEngine(device="cpu")
    m = full_model(first, "m")
    base = export(first, m, tmp_path / "a")
    second = TorchEngine(device="cpu")
    m2 = full_model(second, "m")
    _train(second, m2, "different weights")
    delta = export(second, m2, tmp_path / "b", "delta", base)
    assert bit_equal(rebuild_snapshot(delta), _state(second, m2))


def test_broken_chains_are_reported(engine: TorchEngine, tmp_path: Path) -> None:
    m = full_model(engine, "m")
    base = export(engine, m, tmp_path / "a")
    _train(engine, m, "one")
    delta = export(engine, m, tmp_path / "b", "delta", base)
    # replace the base by another export under the same name
    _train(engine, m, "two")
    shutil.rmtree(base)
    export(engine, m, base)
    with pytest.raises(ValueError, match="another version"):
        rebuild_snapshot(delta)
    shutil.rmtree(base)
    with pytest.raises(ValueError, match="not a sampler export"):
        rebuild_snapshot(delta)


def test_a_corrupted_delta_fails_its_checksum(engine: TorchEngine, tmp_path: Path) -> None:
    m = full_model(engine, "m")
    base = export(engine, m, tmp_path / "a")
    _train(engine, m, "one")
    delta = export(engine, m, tmp_path / "b", "delta", base)
    diff = load_file(str(delta / "delta.safetensors"))
    with safe_open(str(delta / "delta.safetensors"), framework="pt") as f:
        checksums = f.metadata()
    # a delta computed against other weights, under the real checksums: the library's
    # checksum refuses it, so the chain never rebuilds into other weights
    other = {n: torch.zeros_like(t) for n, t in diff.items()}
    save_file(other, str(delta / "delta.safetensors"), metadata=checksums)
    with pytest.raises(ValueError, match="does not apply"):
        rebuild_snapshot(delta)


def test_delta_needs_a_previous_export(engine: TorchEngine, tmp_path: Path) -> None:
    m = full_model(engine, "m")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="previous"):
        engine.save_for_sampler(m, tmp_path / "d", "delta", None)
    with pytest.raises(UserError, match="checkpoint_type"):
        engine.save_for_sampler(m, tmp_path / "d", "full", None)
    with pytest.raises(UserError, match="merged_base"):
        engine.save_for_sampler(m, tmp_path / "d", "merged_base", None)


def test_lora_exports_a_peft_adapter(engine: TorchEngine, tmp_path: Path) -> None:
    m = lora_model(engine, "m", rank=4, train_unembed=False)
    _train(engine, m, "adapter")
    d = export(engine, m, tmp_path / "a")
    assert sorted(p.name for p in d.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "firetitan-export.json",
    ]
    config = json.loads((d / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = load_file(str(d / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape[1] == 4
    assert all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in tensors
    )
    # a LoRA delta chain works the same way
    _train(engine, m, "more")
    d2 = export(engine, m, tmp_path / "b", "delta", d)
    live = {
        f"base_model.model.{n}": p.detach()
        for n, p in engine.module(m).named_parameters()
        if p.requires_grad
    }
    assert bit_equal(rebuild_snapshot(d2), live)


def test_merged_lora_export_matches_the_live_model(engine: TorchEngine, tmp_path: Path) -> None:
    m = lora_model(engine, "m", rank=8)
    for i in range(3):
        _train(engine, m, f"merge me {i}")
    d = export(engine, m, tmp_path / "merged", "merged_base")
    assert (d / "model.safetensors").is_file() and not (d / "adapter_config.json").exists()
    hf = load_hf(d)
    data = sft_batch()
    out = engine.forward(m, data, "cross_entropy", None)
    with torch.no_grad():
        for i, datum in enumerate(data):
            diff = out.loss_fn_outputs[i]["logprobs"].to_torch() - ref_logprobs(hf, datum)
            assert diff.abs().max() <= 1e-4
