"""The base/delta chain from the SDK side: what is exported and hot-loaded, in which
order, and how a loop resumes, with a null-engine trainer and a scriptable deployment
(the real local deployment's end-to-end run is in test_local_deployment.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import tinker
from shared import BASE_MODEL, connect

from firetitan import (
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    AsyncWeightSyncer,
    ClientUsageError,
    DeploymentConfig,
    HotLoadError,
)
from firetitan.local import LocalTrainer

from .fake_deployment import KEY, FakeDeployment, loading_state

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def _model(
    trainer: LocalTrainer, fake: FakeDeployment
) -> AsyncIterator[tuple[AsyncFiretitanServiceClient, AsyncFiretitanTrainingClient]]:
    """A service client that hot-loads onto ``fake``, and a full-parameter model."""
    async with connect(
        trainer.base_url,
        trainer.api_key,
        tokenizer="firetitan/byte",  # the null engine names none
        deployment=DeploymentConfig(
            base_url=fake.base_url, deployment_id="dep", poll_interval=0.05
        ),
        deployment_api_key=KEY,
    ) as service:
        yield service, await service.create_training_client(BASE_MODEL, lora_rank=0)


def _sent(fake: FakeDeployment) -> list[tuple[str, str | None]]:
    return [
        (
            p["identity"],
            (p.get("incremental_snapshot_metadata") or {}).get("previous_snapshot_identity"),
        )
        for p in fake.hot_load_posts
    ]


async def test_base_then_deltas_each_naming_the_snapshot_it_applies_to(
    null_trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _model(null_trainer, fake) as (_, tc):
        syncer = AsyncWeightSyncer(tc)
        names = [(await syncer.save_and_hot_load(f"step-{i}")).snapshot_name for i in range(3)]
    assert _sent(fake) == [(names[0], None), (names[1], names[0]), (names[2], names[1])]


async def test_a_deployment_that_moved_on_gets_a_base_never_a_dangling_delta(
    null_trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _model(null_trainer, fake) as (_, tc):
        syncer = AsyncWeightSyncer(tc)
        first = (await syncer.save_and_hot_load("a")).snapshot_name
        # Something else loads another snapshot on one replica; then an export is saved
        # but never hot-loaded. Either breaks the chain the next delta would need.
        fake.replicas[1]["current_snapshot_identity"] = "foreign"
        second = (await syncer.save_and_hot_load("b")).snapshot_name
        await tc.save_weights_for_sampler_ext("c")  # exported, not loaded
        third = (await syncer.save_and_hot_load("d")).snapshot_name
    assert _sent(fake) == [(first, None), (second, None), (third, None)]


async def test_a_new_syncer_after_a_restart_continues_the_chain_it_finds(
    null_trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _model(null_trainer, fake) as (_, tc):
        first = (await AsyncWeightSyncer(tc).save_and_hot_load("a")).snapshot_name
        second = (await AsyncWeightSyncer(tc).save_and_hot_load("b")).snapshot_name
    async with _model(null_trainer, fake) as (_, tc):  # a restarted process
        third = (await AsyncWeightSyncer(tc).save_and_hot_load("c")).snapshot_name
    assert _sent(fake) == [(first, None), (second, first), (third, None)]


async def test_sampling_clients_hot_load_only_what_is_not_served_and_sample_there(
    null_trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _model(null_trainer, fake) as (service, tc):
        sampler = await tc.save_weights_and_get_sampling_client("s")
        again = await service.create_sampling_client(model_path=sampler.model_path)
        params = tinker.SamplingParams(max_tokens=2, seed=5, stop=[ord("x")])
        response = await again.sample(tinker.ModelInput.from_ints([1, 2]), 2, params)
        assert [list(s.tokens) for s in response.sequences] == [[5, 6], [6, 7]]
        assert (await sampler.get_tokenizer()).name == "firetitan/byte"
        assert (await tc.get_tokenizer()).name == "firetitan/byte"
        with pytest.raises(HotLoadError):
            fake.load_plan = lambda identity, replicas: replicas[0].update(
                loading_state=loading_state("error", identity)
            )
            await service.create_sampling_client(
                model_path="never-saved-00000000", base_model=BASE_MODEL
            )
    assert [p["identity"] for p in fake.hot_load_posts] == [
        sampler.model_path,
        "never-saved-00000000",
    ]
    assert [c["body"]["stop"] for c in fake.completions] == [["x"], ["x"]]


async def test_a_syncer_needs_a_deployment(null_trainer: LocalTrainer) -> None:
    async with connect(null_trainer.base_url, null_trainer.api_key) as service:
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        with pytest.raises(ClientUsageError, match="no deployment"):
            AsyncWeightSyncer(tc)
