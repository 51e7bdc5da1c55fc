"""``weights=DIR``: real Hugging Face checkpoints from a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from shared import sample_request, save_tiny_llama, save_tokenizer

from firetitan.local.engine import ModelSpec, SampleSource
from firetitan.local.torch import TorchEngine

from .helpers import load_hf, ref_logprobs


def _save_checkpoint(directory: Path, *, tokenizer: bool) -> None:
    save_tiny_llama(
        directory,
        seed=123,
        vocab_size=300,
        max_position_embeddings=128,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {
            "<unk>": 0,
            "<s>": 1,
            "</s>": 2,
            **{w: i + 3 for i, w in enumerate(["hello", "world", "stop", "here"])},
        }
        inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        inner.pre_tokenizer = pre_tokenizers.Whitespace()
        save_tokenizer(directory, inner)


def _datum(ids: list[int]) -> tinker.Datum:
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(ids[1:], np.int64)},
    )


@pytest.mark.parametrize("tokenizer", [False, True], ids=["weights-only", "with-tokenizer"])
def test_loads_a_saved_checkpoint(tmp_path: Path, tokenizer: bool) -> None:
    ckpt = tmp_path / "hf"
    _save_checkpoint(ckpt, tokenizer=tokenizer)
    engine = TorchEngine(base_model="my-llama", weights=ckpt, device="cpu")
    assert engine.supported_models() == [{"model_name": "my-llama", "max_context_length": 128}]
    engine.create_model("m", ModelSpec(base_model="anything"))
    engine.create_model("l", ModelSpec(base_model="anything", lora_rank=2))
    assert engine.get_info("m")["model_data"]["arch"] == "LlamaForCausalLM"

    reference = load_hf(ckpt)
    data = [_datum([1, 5, 17, 299, 42, 2]), _datum([1, 3, 4])]
    out = engine.forward("m", data, "cross_entropy", None)
    with torch.no_grad():
        for i, d in enumerate(data):
            diff = out.loss_fn_outputs[i]["logprobs"].to_torch() - ref_logprobs(reference, d)
            assert diff.abs().max() <= 1e-5

    for m in ("m", "l"):
        engine.forward_backward(m, data, "cross_entropy", None)
        engine.optim_step(m, tinker.AdamParams(learning_rate=1e-3), None)
        (tmp_path / m).mkdir()
        engine.save_for_sampler(m, tmp_path / m, "base", None)
    # tied embeddings are exported once and re-tied by transformers
    tied = load_hf(tmp_path / "m")
    assert (
        tied.get_output_embeddings().weight.data_ptr()
        == tied.get_input_embeddings().weight.data_ptr()
    )
    res = engine.sample(
        SampleSource(export_dir=tmp_path / "l"),
        sample_request([1, 3], 2, tinker.SamplingParams(max_tokens=4, seed=0, stop=[])),
    )
    assert all(len(s.tokens) == 4 for s in res.sequences)
    # an adapter on the tied output layer unties it in a merged export
    (tmp_path / "merged").mkdir()
    engine.save_for_sampler("l", tmp_path / "merged", "merged_base", None)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    merged = load_hf(tmp_path / "merged")
    live = engine.forward("l", data, "cross_entropy", None)
    with torch.no_grad():
        for i, d in enumerate(data):
            diff = live.loss_fn_outputs[i]["logprobs"].to_torch() - ref_logprobs(merged, d)
            assert diff.abs().max() <= 1e-4
    if tokenizer:
        assert engine.tokenizer.encode("hello world") == [3, 4]
        assert engine.tokenizer.eos_token_id == 2
        assert engine.get_info("m")["model_data"]["tokenizer_id"] == str(ckpt.resolve())


def test_missing_or_unloadable_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        TorchEngine(weights=tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load"):
        TorchEngine(weights=tmp_path / "empty", device="cpu")
