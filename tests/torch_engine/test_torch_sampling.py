"""Sampling: max_tokens, stop, seeds, logprobs, sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
from shared import sample_request

from firetitan.local.engine import ModelSpec, SampleSource, UserError
from firetitan.local.torch import TorchEngine
from firetitan.local.torch.sampling import plan_sampling

from .helpers import QWEN, TOK, export, full_model, lora_model, sft_datum

PROMPT = TOK.encode("Once upon a time", add_bos=True)


def _sample(
    engine: TorchEngine, source: SampleSource, n: int = 3, **params: object
) -> tinker.SampleResponse:
    return engine.sample(source, sample_request(PROMPT, n, tinker.SamplingParams(**params)))


def test_max_tokens_and_length_reason(engine: TorchEngine) -> None:
    res = _sample(engine, SampleSource(base_model=QWEN), n=4, max_tokens=7, stop=[], seed=1)
    assert len(res.sequences) == 4
    assert len({s.sequence_id for s in res.sequences}) == 4
    for s in res.sequences:
        assert len(s.tokens) == 7 and s.stop_reason == "length"
        assert s.logprobs is not None and len(s.logprobs) == 7
        assert s.tokens_np is not None and s.tokens_np.dtype == np.int32
    zero = _sample(engine, SampleSource(base_model=QWEN), n=1, max_tokens=0)
    assert zero.sequences[0].tokens == [] and zero.sequences[0].stop_reason == "length"


def test_seed_determinism(engine: TorchEngine) -> None:
    src = SampleSource(base_model=QWEN)
    a = _sample(engine, src, max_tokens=12, seed=5)
    b = _sample(engine, src, max_tokens=12, seed=5)
    c = _sample(engine, src, max_tokens=12, seed=6)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.logprobs for s in a.sequences] == [s.logprobs for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    greedy = [_sample(engine, src, n=2, max_tokens=8, temperature=0.0) for _ in range(2)]
    seqs = [s.tokens for r in greedy for s in r.sequences]
    assert all(t == seqs[0] for t in seqs)
    top1 = _sample(engine, src, n=1, max_tokens=8, top_k=1, seed=3)
    assert top1.sequences[0].tokens == seqs[0]
    tiny_p = _sample(engine, src, n=1, max_tokens=8, top_p=1e-6, seed=3)
    assert tiny_p.sequences[0].tokens == seqs[0]


def test_stop_token_and_stop_string(engine: TorchEngine) -> None:
    src = SampleSource(base_model=QWEN)
    full = _sample(engine, src, n=1, max_tokens=16, temperature=0.0, stop=[]).sequences[0].tokens
    j = 5
    stop_tok = full[j]
    first = full.index(stop_tok)
    by_token = _sample(engine, src, n=1, max_tokens=16, temperature=0.0, stop=[stop_tok])
    assert by_token.sequences[0].tokens == full[: first + 1]
    assert by_token.sequences[0].stop_reason == "stop"
    # a string made of the bytes of tokens 3..5
    text = TOK.decode(full[3:6])
    by_string = _sample(engine, src, n=1, max_tokens=16, temperature=0.0, stop=[text])
    got = by_string.sequences[0]
    assert got.stop_reason == "stop" and text in TOK.decode(got.tokens)
    assert text not in TOK.decode(got.tokens[:-1])


@pytest.mark.parametrize(
    ("stop", "eos_stops"),
    [(None, True), (["\n\n"], True), ("x", True), ([7], True), ([], False)],
    ids=["none", "strings", "string", "ids", "empty"],
)
def test_only_an_empty_stop_list_turns_eos_off(stop: object, eos_stops: bool) -> None:
    # tinker's SamplingParams: None keeps EOS stopping, [] disables every stop, EOS too.
    params = tinker.SamplingParams(max_tokens=4, stop=stop)  # type: ignore[arg-type]
    plan = plan_sampling(PROMPT, params, tokenizer=TOK, context=64)
    assert (TOK.eos_token_id in plan.stop_ids) is eos_stops


def test_sampled_logprobs_equal_forward_logprobs(engine: TorchEngine) -> None:
    m = full_model(engine, "m")
    res = engine.sample(
        SampleSource(model_id=m),
        sample_request(
            PROMPT, 3, tinker.SamplingParams(max_tokens=10, stop=[], seed=2), prompt_logprobs=True
        ),
    )
    for s in res.sequences:
        ids = PROMPT + s.tokens
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64)},
        )
        lp = engine.forward(m, [datum], "cross_entropy", None).loss_fn_outputs[0]["logprobs"]
        fwd = lp.to_numpy()
        assert np.abs(fwd[len(PROMPT) - 1 :] - np.asarray(s.logprobs)).max() <= 1e-5
        assert res.prompt_logprobs is not None and res.prompt_logprobs[0] is None
        assert np.abs(np.asarray(res.prompt_logprobs[1:]) - fwd[: len(PROMPT) - 1]).max() <= 1e-5


def test_exports_sample_like_the_live_model(engine: TorchEngine, tmp_path: Path) -> None:
    for model_id in (full_model(engine, "f"), lora_model(engine, "l")):
        engine.forward_backward(
            model_id, [sft_datum("Once upon a time there")], "cross_entropy", None
        )
        engine.optim_step(model_id, tinker.AdamParams(learning_rate=1e-2), None)
        base = export(engine, model_id, tmp_path / model_id / "a")
        engine.forward_backward(model_id, [sft_datum("was a cat")], "cross_entropy", None)
        engine.optim_step(model_id, tinker.AdamParams(learning_rate=1e-2), None)
        delta = export(engine, model_id, tmp_path / model_id / "b", "delta", base)
        live = _sample(engine, SampleSource(model_id=model_id), max_tokens=10, seed=4)
        exported = _sample(engine, SampleSource(export_dir=delta), max_tokens=10, seed=4)
        assert [s.tokens for s in live.sequences] == [s.tokens for s in exported.sequences]
        assert [s.logprobs for s in live.sequences] == [s.logprobs for s in exported.sequences]


def test_bad_sampling_requests_are_user_errors(engine: TorchEngine, tmp_path: Path) -> None:
    src = SampleSource(base_model=QWEN)
    with pytest.raises(UserError, match="prompt token 1"):
        engine.sample(src, sample_request([1, 999], 1, tinker.SamplingParams()))
    with pytest.raises(UserError, match="num_samples"):
        engine.sample(src, sample_request(PROMPT, 0, tinker.SamplingParams()))
    with pytest.raises(UserError, match="top_p"):
        engine.sample(src, sample_request(PROMPT, 1, tinker.SamplingParams(top_p=0.0)))
    with pytest.raises(UserError, match="not a sampler export"):
        engine.sample(
            SampleSource(export_dir=tmp_path), sample_request(PROMPT, 1, tinker.SamplingParams())
        )
    with pytest.raises(UserError, match="exactly one"):
        engine.sample(SampleSource(), sample_request(PROMPT, 1, tinker.SamplingParams()))


def test_unseeded_sampling_is_reproducible_per_engine() -> None:
    runs = []
    for _ in range(2):
        engine = TorchEngine(device="cpu")
        engine.create_model("m", ModelSpec(base_model=QWEN))
        src = SampleSource(model_id="m")
        runs.append(
            [s.tokens for _ in range(2) for s in _sample(engine, src, max_tokens=6).sequences]
        )
    assert runs[0] == runs[1]
    assert runs[0][:3] != runs[0][3:]  # the model's sampling generator moves on
