"""firetitan's sampling client (both surfaces) against the torch engine: top-k prompt and
sampled logprobs, ``target_prompt_logprobs`` (dense and CSR) and alternative prompt
tokens agree with the trainer's own ``forward`` logprobs; bad options are refused by
name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import tinker
from shared import SURFACES, Surface

from firetitan.local import LocalTrainer
from firetitan.local.engine import SampleSource
from firetitan.tokenizers import ByteTokenizer

from .helpers import BASE_MODEL, FAST_TRAINER

TOK = ByteTokenizer()
PROMPT = TOK.encode("Q: cat\nA:", add_bos=True)
ROWS = len(PROMPT) - 1


@pytest_asyncio.fixture
async def torch_trainer() -> AsyncIterator[LocalTrainer]:
    async with LocalTrainer("torch", size="tiny", device="cpu", **FAST_TRAINER) as trainer:
        yield trainer


async def _forward_distribution(
    surface: Surface, training: Any, vocab: int
) -> npt.NDArray[np.float32]:
    """(ROWS, vocab): `forward`'s logprob of every id at prompt positions 1.."""
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": np.tile(np.arange(vocab, dtype=np.int64), (ROWS, 1))},
    )
    out = await surface.call(training.forward, [datum], "cross_entropy")
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float32)


@pytest.mark.asyncio
@pytest.mark.parametrize("surface", SURFACES, ids=str)
async def test_scores_match_forward(torch_trainer: LocalTrainer, surface: Surface) -> None:
    vocab = torch_trainer.engine.source_limits(SampleSource(base_model=BASE_MODEL)).vocab_size
    async with surface.service(torch_trainer.base_url, torch_trainer.api_key) as service:
        training = await surface.call(service.create_training_client, BASE_MODEL)
        expected = await _forward_distribution(surface, training, vocab)
        sampler = await surface.call(training.save_weights_and_get_sampling_client)
        prompt = tinker.ModelInput.from_ints(PROMPT)
        params = tinker.SamplingParams(max_tokens=4, seed=3, stop=[])
        dense = np.full((ROWS, 2), -1, dtype=np.int64)
        dense[:, 0] = PROMPT[1:]
        dense[-1, 1] = 42
        res = await surface.call(
            sampler.sample,
            prompt,
            2,
            params,
            True,  # include_prompt_logprobs
            3,  # topk_prompt_logprobs
            2,  # topk_sample_logprobs
            tinker.TensorData.from_numpy(dense),
            2,  # prompt_alt_tokens_k
        )

        assert res.topk_prompt_logprobs[0] is None
        for i, row in enumerate(res.topk_prompt_logprobs[1:]):
            assert [lp for _t, lp in row] == sorted((lp for _t, lp in row), reverse=True)
            assert row[0][0] == int(np.argmax(expected[i]))
            assert all(abs(lp - expected[i, tok]) < 1e-4 for tok, lp in row)
        target = res.target_prompt_logprobs
        assert target.dtype == "float32" and target.shape == [ROWS, 2]
        want = np.where(dense >= 0, expected[np.arange(ROWS)[:, None], dense.clip(0)], 0.0)
        np.testing.assert_allclose(target.to_numpy(), want, atol=1e-4)
        for seq in res.sequences:
            assert len(seq.topk_logprobs) == len(seq.tokens)
            assert all(len(row) == 2 and row[0][1] >= row[1][1] for row in seq.topk_logprobs)
        alt = res.prompt_alt_tokens
        drawn = alt.tokens.to_numpy()
        assert drawn.shape == (ROWS, 2)
        np.testing.assert_allclose(
            alt.logprobs.to_numpy(), expected[np.arange(ROWS)[:, None], drawn], atol=1e-4
        )

        # CSR: only the listed cells are asked, and answered in the same layout.
        cells = {(1, 1): PROMPT[2], (2, 2): 7}  # (row, column): id
        crow = [sum(row < r for row, _col in cells) for r in range(ROWS + 1)]
        sparse = tinker.TensorData(
            data=list(cells.values()),
            dtype="int64",
            shape=[ROWS, 3],
            sparse_crow_indices=crow,
            sparse_col_indices=[col for _row, col in cells],
        )
        res = await surface.call(sampler.sample, prompt, 1, params, False, 0, 0, sparse)
        got = res.target_prompt_logprobs
        assert got.sparse_crow_indices == sparse.sparse_crow_indices
        assert got.sparse_col_indices == [1, 2]
        np.testing.assert_allclose(got.data, [expected[1, PROMPT[2]], expected[2, 7]], atol=1e-4)

        # prompt_logprobs_last_n also blanks the top-k rows before the last N.
        res = await surface.call(sampler.sample, prompt, 1, params, True, 2, 0, None, 0, 3)
        assert res.topk_prompt_logprobs[:-3] == [None] * (len(PROMPT) - 3)
        assert all(row is not None for row in res.topk_prompt_logprobs[-3:])


@pytest.mark.asyncio
async def test_bad_options_are_refused_by_name(torch_trainer: LocalTrainer) -> None:
    surface = SURFACES[0]
    async with surface.service(torch_trainer.base_url, torch_trainer.api_key) as service:
        sampler = await service.create_sampling_client(base_model=BASE_MODEL)
        prompt = tinker.ModelInput.from_ints(PROMPT)
        params = tinker.SamplingParams(max_tokens=1)
        with pytest.raises(ValueError, match="topk_sample_logprobs"):
            sampler.sample(prompt, 1, params, topk_sample_logprobs=-1)
        with pytest.raises(ValueError, match="prompt_logprobs_last_n"):
            sampler.sample(prompt, 1, params, prompt_logprobs_last_n=2)
        too_wide = sampler.sample(prompt, 1, params, topk_prompt_logprobs=5000)
        with pytest.raises(Exception, match=r"topk_prompt_logprobs must be an integer in \[0, "):
            await too_wide
        rows_off = tinker.TensorData.from_numpy(np.zeros((ROWS + 1, 1), dtype=np.int64))
        wrong = sampler.sample(prompt, 1, params, target_prompt_logprobs=rows_off)
        with pytest.raises(Exception, match=r"target_prompt_logprobs must have shape"):
            await wrong
