"""LoRA and base-only models."""

from __future__ import annotations

import pytest
import tinker
import torch

from firetitan.local.engine import ModelSpec, UserError
from firetitan.local.torch import TorchEngine
from firetitan.local.torch.lora import LoRALinear

from .helpers import QWEN, full_model, lora_model, sft_batch


def _base_tensors(engine: TorchEngine, model_id: str) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in engine.module(model_id).named_parameters()
        if not p.requires_grad
    }


def test_lora_training_leaves_base_weights_bit_identical(engine: TorchEngine) -> None:
    m = lora_model(engine, "m", rank=8)
    engine.create_model("ref", ModelSpec(base_model=QWEN, base_only=True))
    base_before = _base_tensors(engine, m)
    adapters_before = {
        n: p.detach().clone() for n, p in engine.module(m).named_parameters() if p.requires_grad
    }
    ref_out = engine.forward("ref", sft_batch(), "cross_entropy", None)
    for _ in range(3):
        engine.forward_backward(m, sft_batch(), "cross_entropy", None)
        engine.optim_step(m, tinker.AdamParams(learning_rate=1e-2, weight_decay=0.1), None)
    base_after = _base_tensors(engine, m)
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    changed = [
        n
        for n, p in engine.module(m).named_parameters()
        if p.requires_grad and not torch.equal(p.detach(), adapters_before[n])
    ]
    assert changed  # lora_B moved (lora_A too once B is non-zero)
    again = engine.forward("ref", sft_batch(), "cross_entropy", None)
    for a, b in zip(ref_out.loss_fn_outputs, again.loss_fn_outputs, strict=True):
        assert torch.equal(a["logprobs"].to_torch(), b["logprobs"].to_torch())


def test_fresh_adapter_does_not_change_outputs(engine: TorchEngine) -> None:
    full = full_model(engine, "full")
    m = lora_model(engine, "m", rank=4)
    a = engine.forward(full, sft_batch(), "cross_entropy", None)
    b = engine.forward(m, sft_batch(), "cross_entropy", None)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        assert torch.allclose(x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "wrapped"),
    [
        (
            {"train_attn": True, "train_mlp": False, "train_unembed": False},
            {"q_proj", "k_proj", "v_proj", "o_proj"},
        ),
        (
            {"train_attn": False, "train_mlp": True, "train_unembed": False},
            {"gate_proj", "up_proj", "down_proj"},
        ),
        ({"train_attn": False, "train_mlp": False, "train_unembed": True}, {"lm_head"}),
    ],
)
def test_train_flags_choose_the_adapted_layers(
    engine: TorchEngine, flags: dict[str, bool], wrapped: set[str]
) -> None:
    m = lora_model(engine, "m", rank=2, **flags)
    got = {
        name.rsplit(".", 1)[-1]
        for name, mod in engine.module(m).named_modules()
        if isinstance(mod, LoRALinear)
    }
    assert got == wrapped
    info = engine.get_info(m)
    assert info["is_lora"] and info["lora_rank"] == 2


def test_lora_options_are_validated(engine: TorchEngine) -> None:
    with pytest.raises(UserError, match="at least one"):
        lora_model(engine, "m", train_attn=False, train_mlp=False, train_unembed=False)
    with pytest.raises(UserError, match="rank"):
        engine.create_model("n", ModelSpec(base_model=QWEN, lora_rank=-1))


def test_lora_seed_and_alpha_defaults(engine: TorchEngine) -> None:
    engine.create_model("a", ModelSpec(base_model=QWEN, lora_rank=4, lora_seed=7))
    engine.create_model("b", ModelSpec(base_model=QWEN, lora_rank=4, lora_seed=7))
    engine.create_model("c", ModelSpec(base_model=QWEN, lora_rank=4, lora_seed=8))
    a, b, c = (dict(engine.module(x).named_parameters()) for x in "abc")
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    layer = engine.module("a").get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0  # alpha = 2 * rank


def test_base_only_models_are_forward_only(engine: TorchEngine) -> None:
    engine.create_model("ref", ModelSpec(base_model=QWEN, base_only=True))
    out = engine.forward("ref", sft_batch(), "cross_entropy", None)
    assert len(out.loss_fn_outputs) == len(sft_batch())
    with pytest.raises(UserError, match="base-only"):
        engine.forward_backward("ref", sft_batch(), "cross_entropy", None)
    with pytest.raises(UserError, match="base-only"):
        engine.optim_step("ref", tinker.AdamParams(), None)
    assert not any(p.requires_grad for p in engine.module("ref").parameters())


def test_models_of_one_base_share_frozen_weights(engine: TorchEngine) -> None:
    lora = lora_model(engine, "l")
    engine.create_model("ref", ModelSpec(base_model=QWEN, base_only=True))
    full = full_model(engine, "f")
    name = "model.embed_tokens.weight"
    ptr = {m: engine.module(m).get_parameter(name).data_ptr() for m in (lora, "ref", full)}
    assert ptr[lora] == ptr["ref"] != ptr[full]
    engine.unload_model(full)
    with pytest.raises(UserError, match="unknown model_id"):
        engine.forward(full, sft_batch(), "cross_entropy", None)
