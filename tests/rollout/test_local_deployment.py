"""End to end: firetitan's own async and sync clients against the local trainer and the
local deployment beside it (``LocalTrainer(deployment=True)``, the torch engine's tiny
stand-in). Base, delta and delta snapshots are hot-loaded; after each, the logprobs the
deployment reports for the tokens it sampled equal the trainer's own ``forward``
logprobs for those tokens, so the chain was applied exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tinker
from shared import BASE_MODEL, connect

from firetitan import (
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    AsyncWeightSyncer,
    ClientConfig,
    DeploymentConfig,
    FiretitanServiceClient,
    FiretitanTrainingClient,
    HotLoadError,
    WeightSyncer,
)
from firetitan.local import LocalTrainer
from firetitan.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
PROMPT = TOK.encode("7=", add_bos=True)
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def local() -> Iterator[LocalTrainer]:
    with LocalTrainer(base_model=BASE_MODEL, deployment=True) as trainer:
        yield trainer


def _config(local: LocalTrainer) -> DeploymentConfig:
    dep = local.deployment
    return DeploymentConfig(
        base_url=dep.base_url,
        account=dep.account,
        deployment_id=dep.deployment_id,
        poll_interval=0.2,
    )


def _datum(tokens: list[int]) -> tinker.Datum:
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _step_batch(step: int) -> list[tinker.Datum]:
    text = ["7=seven", "3=three", "5=five"][step % 3]
    return [_datum(TOK.encode(text, add_bos=True, add_eos=True))]


ADAM = tinker.AdamParams(learning_rate=3e-3)
PARAMS = tinker.SamplingParams(max_tokens=6, temperature=1.0, seed=3)


def _check_against_forward(sampled: tinker.SampleResponse, forward: Any) -> None:
    """``forward`` holds one output per sequence, over prompt + sampled tokens."""
    for seq, out in zip(sampled.sequences, forward.loss_fn_outputs, strict=True):
        trainer_lp = np.asarray(out["logprobs"].data)[len(PROMPT) - 1 :]
        assert len(seq.tokens) == len(trainer_lp) > 0
        np.testing.assert_allclose(seq.logprobs, trainer_lp, atol=TOLERANCE)


def _forward_data(sampled: tinker.SampleResponse) -> list[tinker.Datum]:
    return [_datum(PROMPT + list(seq.tokens)) for seq in sampled.sequences]


async def _async_round(
    tc: AsyncFiretitanTrainingClient, service: AsyncFiretitanServiceClient, name: str
) -> str:
    result = await AsyncWeightSyncer(tc).save_and_hot_load(name)
    sampler = await service.create_sampling_client(model_path=result.path)
    sampled = await sampler.sample(tinker.ModelInput.from_ints(PROMPT), 3, PARAMS)
    assert len({tuple(s.tokens) for s in sampled.sequences}) > 1, "seeded samples differ"
    forward = await tc.forward(_forward_data(sampled), "cross_entropy")
    _check_against_forward(sampled, forward)
    # compute_logprobs through the deployment: the trainer's prompt logprobs.
    scored = await sampler.compute_logprobs(tinker.ModelInput.from_ints(PROMPT))
    reference = await tc.forward([_datum(PROMPT)], "cross_entropy")
    np.testing.assert_allclose(
        scored[1:], np.asarray(reference.loss_fn_outputs[0]["logprobs"].data), atol=TOLERANCE
    )
    return result.snapshot_name


def test_async_client_base_delta_delta_then_an_unknown_identity(local: LocalTrainer) -> None:
    async def main() -> list[tuple[str, Any]]:
        async with connect(
            local.base_url, local.api_key, ClientConfig(), deployment=_config(local)
        ) as service:
            tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
            names = []
            for step in range(3):
                names.append(await _async_round(tc, service, f"e2e-async-{step}"))
                await tc.forward_backward(_step_batch(step), "cross_entropy")
                await tc.optim_step(ADAM)
            with pytest.raises(HotLoadError, match="never-saved"):
                await service.deployment.hot_load("never-saved-00000000", base_model=BASE_MODEL)
            return [(n, tc.delta_base(n)[1]) for n in names]

    chain = asyncio.run(main())
    assert [previous for _, previous in chain] == [None, chain[0][0], chain[1][0]]


def test_sync_client_base_delta_delta(local: LocalTrainer) -> None:
    with FiretitanServiceClient(
        base_url=local.base_url, api_key=local.api_key, deployment=_config(local)
    ) as service:
        tc: FiretitanTrainingClient = service.create_training_client(BASE_MODEL, lora_rank=0)
        syncer = WeightSyncer(tc)
        previous = None
        for step in range(3):
            result = syncer.save_and_hot_load(f"e2e-sync-{step}")
            assert tc.delta_base(result.snapshot_name) == (True, previous)
            previous = result.snapshot_name
            sampler = service.create_sampling_client(model_path=result.path)
            sampled = sampler.sample(tinker.ModelInput.from_ints(PROMPT), 2, PARAMS).result()
            forward = tc.forward(_forward_data(sampled), "cross_entropy").result()
            _check_against_forward(sampled, forward)
            tc.forward_backward(_step_batch(step), "cross_entropy")
            tc.optim_step(ADAM).result()
        assert tc.get_tokenizer() == TOK
