"""The base/delta chain from the SDK side: what is exported and hot-loaded, in which
order, and how a loop resumes, with a null-engine trainer and a scriptable deployment
(the real local deployment's end-to-end run is in test_local_deployment.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import tinker
from _async.helpers import FAST_CLIENT, FAST_TRAINER

from firetitan import (
    AsyncFiretitanServiceClient,
    AsyncWeightSyncer,
    ClientUsageError,
    DeploymentConfig,
    HotLoadError,
)
from firetitan.local import LocalTrainer

from .fake_deployment import BASE_MODEL, KEY, FakeDeployment

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDeployment]:
    server = await FakeDeployment(replicas=2).start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def trainer() -> AsyncIterator[LocalTrainer]:
    async with LocalTrainer("null", **FAST_TRAINER) as local:
        yield local


def _service(trainer: LocalTrainer, fake: FakeDeployment) -> AsyncFiretitanServiceClient:
    return AsyncFiretitanServiceClient(
        base_url=trainer.base_url,
        api_key=trainer.api_key,
        config=FAST_CLIENT,
        tokenizer="firetitan/byte",  # the null engine names none
        deployment=DeploymentConfig(
            base_url=fake.base_url, deployment_id="dep", poll_interval=0.05
        ),
        deployment_api_key=KEY,
    )


def _sent(fake: FakeDeployment) -> list[tuple[str, str | None]]:
    return [
        (
            p["identity"],
            (p.get("incremental_snapshot_metadata") or {}).get("previous_snapshot_identity"),
        )
        for p in fake.hot_load_posts
    ]


async def test_base_then_deltas_each_naming_the_snapshot_it_applies_to(
    trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _service(trainer, fake) as service:
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        syncer = AsyncWeightSyncer(tc)
        names = [(await syncer.save_and_hot_load(f"step-{i}")).snapshot_name for i in range(3)]
    assert _sent(fake) == [(names[0], None), (names[1], names[0]), (names[2], names[1])]


async def test_a_deployment_that_moved_on_gets_a_base_never_a_dangling_delta(
    trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _service(trainer, fake) as service:
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
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
    trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _service(trainer, fake) as service:
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        first = (await AsyncWeightSyncer(tc).save_and_hot_load("a")).snapshot_name
        second = (await AsyncWeightSyncer(tc).save_and_hot_load("b")).snapshot_name
    async with _service(trainer, fake) as service:  # a restarted process: a new model
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        third = (await AsyncWeightSyncer(tc).save_and_hot_load("c")).snapshot_name
    assert _sent(fake) == [(first, None), (second, first), (third, None)]


async def test_sampling_clients_hot_load_only_what_is_not_served_and_sample_there(
    trainer: LocalTrainer, fake: FakeDeployment
) -> None:
    async with _service(trainer, fake) as service:
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        sampler = await tc.save_weights_and_get_sampling_client("s")
        again = await service.create_sampling_client(model_path=sampler.model_path)
        params = tinker.SamplingParams(max_tokens=2, seed=5, stop=[ord("x")])
        response = await again.sample(tinker.ModelInput.from_ints([1, 2]), 2, params)
        assert [list(s.tokens) for s in response.sequences] == [[5, 6], [6, 7]]
        assert (await sampler.get_tokenizer()).name == "firetitan/byte"
        assert (await tc.get_tokenizer()).name == "firetitan/byte"
        with pytest.raises(HotLoadError):
            fake.load_plan = lambda identity, replicas: replicas[0].update(
                loading_state={"stage": "error", "target_snapshot_identity": identity}
            )
            await service.create_sampling_client(
                model_path="never-saved-00000000", base_model=BASE_MODEL
            )
    assert [p["identity"] for p in fake.hot_load_posts] == [
        sampler.model_path,
        "never-saved-00000000",
    ]
    assert [c["body"]["stop"] for c in fake.completions] == [["x"], ["x"]]


async def test_a_syncer_needs_a_deployment(trainer: LocalTrainer) -> None:
    async with AsyncFiretitanServiceClient(
        base_url=trainer.base_url, api_key=trainer.api_key, config=FAST_CLIENT
    ) as service:
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        with pytest.raises(ClientUsageError, match="no deployment"):
            AsyncWeightSyncer(tc)
