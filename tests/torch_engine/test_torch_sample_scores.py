"""Top-k prompt and sampled logprobs, target prompt logprobs and alternative prompt
tokens agree with the trainer's own forward logprobs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import tinker
from shared import sample_request

from firetitan.local.engine import SampleSource
from firetitan.local.torch import TorchEngine

from .helpers import TOK, full_model

PROMPT = TOK.encode("Once upon a time", add_bos=True)


def _forward_distribution(engine: TorchEngine, model_id: str) -> npt.NDArray[np.float32]:
    """The (len(PROMPT) - 1, V) logprobs `forward` gives every id at prompt positions 1..,
    through the (N, K) target form with K the whole vocabulary."""
    vocab = engine.limits(model_id).vocab_size
    rows = len(PROMPT) - 1
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": np.tile(np.arange(vocab, dtype=np.int64), (rows, 1))},
    )
    out = engine.forward(model_id, [datum], "cross_entropy", None)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float32)


def test_prompt_scores_match_forward(engine: TorchEngine) -> None:
    model = full_model(engine, "m")
    expected = _forward_distribution(engine, model)
    rows = len(PROMPT) - 1
    targets = np.full((rows, 3), -1, dtype=np.int64)
    targets[:, 0] = PROMPT[1:]
    targets[2:, 1] = 7
    targets[-1, 2] = 200
    res = engine.sample(
        SampleSource(model_id=model),
        sample_request(
            PROMPT,
            1,
            tinker.SamplingParams(max_tokens=2, seed=1),
            prompt_logprobs=True,
            topk_prompt_logprobs=4,
            target_prompt_logprobs=targets,
            prompt_alt_tokens_k=3,
        ),
    )

    top = res.topk_prompt_logprobs_np
    assert top is not None and top.token_ids.shape == (len(PROMPT), 4)
    lists = res.topk_prompt_logprobs
    assert lists is not None and lists[0] is None  # position 0 has no context
    for i, row in enumerate(lists[1:]):
        assert row is not None and len(row) == 4
        lps = [lp for _tok, lp in row]
        assert lps == sorted(lps, reverse=True)
        assert row[0][0] == int(np.argmax(expected[i]))
        for tok, lp in row:
            assert abs(lp - expected[i, tok]) < 1e-4

    scored = res.target_prompt_logprobs
    assert scored is not None and scored.dtype == "float32" and scored.shape == [rows, 3]
    values = scored.to_numpy()
    want = np.where(targets >= 0, expected[np.arange(rows)[:, None], targets.clip(0)], 0.0)
    np.testing.assert_allclose(values, want, atol=1e-4)
    assert values[0, 1] == 0.0 and values[0, 2] == 0.0

    prompt_lp = res.prompt_logprobs_np
    assert prompt_lp is not None and np.isnan(prompt_lp[0])
    np.testing.assert_allclose(prompt_lp[1:], values[:, 0], atol=1e-6)

    alt = res.prompt_alt_tokens
    assert alt is not None and alt.tokens.shape == [rows, 3] and alt.logprobs.shape == [rows, 3]
    drawn = alt.tokens.to_numpy()
    np.testing.assert_allclose(
        alt.logprobs.to_numpy(), expected[np.arange(rows)[:, None], drawn], atol=1e-4
    )


def test_sampled_topk_and_unchanged_tokens(engine: TorchEngine) -> None:
    model = full_model(engine, "m")
    params = tinker.SamplingParams(max_tokens=6, seed=4, stop=[])
    plain = engine.sample(SampleSource(model_id=model), sample_request(PROMPT, 2, params))
    res = engine.sample(
        SampleSource(model_id=model),
        sample_request(PROMPT, 2, params, topk_sample_logprobs=5, prompt_alt_tokens_k=2),
    )
    # Asking for more leaves what is sampled unchanged.
    assert [s.tokens for s in res.sequences] == [s.tokens for s in plain.sequences]
    for seq in res.sequences:
        top = seq.topk_logprobs_np
        assert top is not None and top.token_ids.shape == (len(seq.tokens), 5)
        assert np.all(np.diff(top.logprobs, axis=1) <= 0)
        assert seq.logprobs is not None
        for t, (tok, lp) in enumerate(zip(seq.tokens, seq.logprobs, strict=True)):
            assert lp <= top.logprobs[t, 0] + 1e-6
            if tok in top.token_ids[t]:
                k = list(top.token_ids[t]).index(tok)
                assert abs(top.logprobs[t, k] - lp) < 1e-5
    greedy = engine.sample(
        SampleSource(model_id=model),
        sample_request(
            PROMPT,
            1,
            tinker.SamplingParams(max_tokens=4, temperature=0.0, stop=[]),
            topk_sample_logprobs=1,
        ),
    ).sequences[0]
    assert greedy.topk_logprobs_np is not None
    assert greedy.topk_logprobs_np.token_ids[:, 0].tolist() == greedy.tokens
