"""Datum builders and reference computations for the torch engine tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tinker
import torch
from shared import BASE_MODEL
from torch import nn

from firetitan.local.engine import ModelSpec
from firetitan.local.torch import ByteTokenizer, TorchEngine

TOK = ByteTokenizer()
QWEN = BASE_MODEL
LLAMA = "accounts/fireworks/models/llama-v3p1-8b-instruct"
TEXTS = (
    "the cat sat on the mat",
    "hello world",
    "a quick brown fox jumps over the lazy dog",
    "abc",
)


def sft_datum(text: str, weights: Sequence[float] | None = None) -> tinker.Datum:
    """Next-token prediction on ``text`` framed by BOS/EOS."""
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    inputs: dict[str, Any] = {"target_tokens": np.asarray(ids[1:], dtype=np.int64)}
    if weights is not None:
        inputs["weights"] = np.asarray(weights, dtype=np.float32)
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)


def sft_batch() -> list[tinker.Datum]:
    return [sft_datum(t) for t in TEXTS]


def full_model(engine: TorchEngine, model_id: str, base: str = QWEN) -> str:
    engine.create_model(model_id, ModelSpec(base_model=base))
    return model_id


def lora_model(engine: TorchEngine, model_id: str, rank: int = 4, **kw: Any) -> str:
    engine.create_model(
        model_id, ModelSpec(base_model=kw.pop("base", QWEN), lora_rank=rank, lora_alpha=32, **kw)
    )
    return model_id


def export(
    engine: TorchEngine,
    model_id: str,
    directory: Path,
    kind: str = "base",
    previous: Path | None = None,
) -> Path:
    directory.mkdir(parents=True)
    engine.save_for_sampler(model_id, directory, kind, previous)
    return directory


def weights(engine: TorchEngine, model_id: str) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor of a model's state."""
    return {k: v.detach().clone() for k, v in engine.module(model_id).state_dict().items()}


def grads(engine: TorchEngine, model_id: str) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone()
        for n, p in engine.module(model_id).named_parameters()
        if p.grad is not None
    }


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_hf(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
    model.eval()
    return model  # type: ignore[no-any-return]


def datum_tokens(datum: tinker.Datum) -> torch.Tensor:
    return torch.tensor(datum.model_input.to_ints(), dtype=torch.int64)


def ref_logprobs(model: nn.Module, datum: tinker.Datum) -> torch.Tensor:
    """Unpadded float32 log-probabilities of a datum's targets, (N,) or (N, K)."""
    logits = model(input_ids=datum_tokens(datum)[None], use_cache=False).logits[0]
    lp_all = torch.log_softmax(logits.float(), dim=-1)
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    if targets.ndim == 1:
        return lp_all.gather(-1, targets[:, None])[:, 0]
    return lp_all.gather(-1, targets)


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all tensors together."""
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5
