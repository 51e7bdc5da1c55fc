"""The sampling client: many concurrent samples on one loop, pickling without the key."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
import tinker
from shared import Surface, proxied

from firetitan import (
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    AsyncSamplingClient,
    ClientClosedError,
    ClientUsageError,
    Limits,
)
from firetitan.local import LocalTrainer

from .helpers import BASE_MODEL, FAST_CLIENT

PROMPT = tinker.ModelInput.from_ints([5, 6, 7, 8])
PARAMS = tinker.SamplingParams(max_tokens=4, temperature=1.0)


@pytest.mark.asyncio
async def test_two_hundred_concurrent_samples_share_a_few_connections(
    trainer: LocalTrainer,
) -> None:
    limits = Limits(max_connections=8, max_poll_connections=4, max_sample_polls=4)
    async with proxied(trainer, config=FAST_CLIENT.evolve(limits=limits)) as (proxy, service):
        tc = await service.create_training_client(BASE_MODEL)
        sampler = await tc.save_weights_and_get_sampling_client("policy")
        futures = [
            sampler.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=3, seed=i))
            for i in range(200)
        ]
        responses = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
        assert all(len(r.sequences) == 1 for r in responses)
        assert len({f.request_id for f in futures}) == 200
        connections = {r.peer for r in proxy.records}
        assert len(connections) <= 8 + 4
        samples = [r.body for r in proxy.requests_to("/api/v1/asample")]
        assert sorted(b["seq_id"] for b in samples) == list(range(1, 201))
        assert {b["sampling_session_id"] for b in samples} == {sampler.sampling_session_id}


@pytest.mark.asyncio
async def test_sample_and_compute_logprobs_on_both_surfaces(
    surface: Surface, any_model: Any
) -> None:
    call = surface.call
    sampler = await call(any_model.save_weights_and_get_sampling_client, "policy")
    response = await call(sampler.sample, PROMPT, 2, PARAMS)
    assert len(response.sequences) == 2
    assert all(1 <= len(s.tokens) <= 4 for s in response.sequences)
    logprobs = await call(sampler.compute_logprobs, PROMPT)
    assert len(logprobs) == 4 and logprobs[0] is None
    with pytest.raises(ValueError, match="num_samples"):
        await call(sampler.sample, PROMPT, 0, PARAMS)


@pytest.mark.asyncio
async def test_cancelling_a_sample_leaves_the_others(service: AsyncFiretitanServiceClient) -> None:
    sampler = await service.create_sampling_client(base_model=BASE_MODEL)
    futures = [sampler.sample(PROMPT, 2, PARAMS) for _ in range(10)]
    assert futures[3].cancel()
    done = await asyncio.gather(*(f for i, f in enumerate(futures) if i != 3))
    assert all(len(r.sequences) == 2 for r in done)
    assert futures[3].cancelled()


@pytest.mark.asyncio
async def test_sampling_client_pickles_without_the_key(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FIRETITAN_API_KEY", "FIREWORKS_API_KEY", "TINKER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    sampler = await service.create_sampling_client(base_model=BASE_MODEL)
    before = await sampler.sample(PROMPT, 1, PARAMS)
    data = pickle.dumps(sampler)
    assert trainer.api_key.encode() not in data
    clone = pickle.loads(data)
    assert isinstance(clone, AsyncSamplingClient)
    assert clone.sampling_session_id == sampler.sampling_session_id
    assert trainer.api_key not in repr(clone)
    # No key anywhere: the first use says so.
    with pytest.raises(ValueError, match="API key"):
        await clone.sample(PROMPT, 1, PARAMS)
    await clone.aclose()

    keyed = pickle.loads(data)
    keyed.set_api_key(trainer.api_key)
    async with keyed:
        after = await keyed.sample(PROMPT, 1, PARAMS)
        assert len(after.sequences) == len(before.sequences) == 1
        with pytest.raises(ClientUsageError):
            keyed.set_api_key("other")

    monkeypatch.setenv("FIRETITAN_API_KEY", trainer.api_key)
    async with pickle.loads(data) as from_env:
        logprobs = await from_env.compute_logprobs(PROMPT)
        assert len(logprobs) == 4


@pytest.mark.asyncio
async def test_standalone_client_and_closed_service(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient
) -> None:
    async with AsyncSamplingClient(
        trainer.base_url, base_model=BASE_MODEL, api_key=trainer.api_key
    ) as standalone:
        response = await standalone.sample(PROMPT, 3, PARAMS)
        assert len(response.sequences) == 3
    with pytest.raises(ClientClosedError):
        standalone.sample(PROMPT, 1, PARAMS)
    sampler = await service.create_sampling_client(base_model=BASE_MODEL)
    await service.aclose()
    with pytest.raises(ClientClosedError):
        sampler.sample(PROMPT, 1, PARAMS)
    with pytest.raises(ValueError, match="num_samples"):
        AsyncSamplingClient(trainer.base_url, base_model=BASE_MODEL).sample(PROMPT, 0, PARAMS)


@pytest.mark.asyncio
async def test_get_base_model_of_a_sampler_made_from_a_path(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient, tc: AsyncFiretitanTrainingClient
) -> None:
    saved = await tc.save_weights_for_sampler_ext("for-base-model")
    sampler = await service.create_sampling_client(model_path=saved.path)
    assert sampler.base_model is None
    assert await sampler.get_base_model() == BASE_MODEL  # read from the export
    standalone = AsyncSamplingClient(trainer.base_url, model_path=saved.path)
    with pytest.raises(ClientUsageError, match="sampling session"):
        await standalone.get_base_model()
    await standalone.aclose()
