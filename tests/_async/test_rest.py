"""The REST client (async core and facade) against the local trainer: training runs,
checkpoints (list, TTL, publish, delete) and sessions, in tinker's types."""

from __future__ import annotations

import aiohttp
import pytest
import tinker

from firetitan import (
    AsyncFiretitanServiceClient,
    AsyncRestClient,
    BadRequestError,
    NotFoundError,
    RestClient,
)
from firetitan._wire import endpoints
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_CLIENT, FAST_TRAINER, batch


@pytest.mark.asyncio
async def test_runs_checkpoints_and_sessions(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient
) -> None:
    tc = await service.create_lora_training_client(BASE_MODEL, rank=4, user_metadata={"k": "v"})
    await tc.forward_backward(batch(1), "cross_entropy")
    await tc.optim_step(ADAM)
    await tc.save_state("a", user_metadata={"note": "first"})
    await tc.save_state("b")
    sampler = await tc.save_weights_for_sampler_ext("s")
    job = trainer.job_id
    a, b = f"tinker://{job}/weights/a", f"tinker://{job}/weights/b"

    async with AsyncRestClient(trainer.base_url, trainer.api_key, config=FAST_CLIENT) as rest:
        run = await rest.get_training_run_by_tinker_path(a)
        assert run.training_run_id == job and run.base_model == BASE_MODEL
        assert run.is_lora and run.lora_rank == 4 and run.user_metadata == {"k": "v"}
        assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == b
        assert (await rest.get_training_run(tc.model_id)).training_run_id == job
        assert [r.training_run_id for r in (await rest.list_training_runs()).training_runs] == [
            job
        ]

        listed = await rest.list_checkpoints(job)
        by_path = {c.tinker_path: c for c in listed.checkpoints}
        assert set(by_path) == {a, b, f"tinker://{job}/sampler_weights/{sampler.snapshot_name}"}
        assert by_path[a].checkpoint_type == "training" and by_path[a].size_bytes
        assert by_path[a].user_metadata == {"note": "first"}

        await rest.set_checkpoint_ttl(a, 3600)
        await rest.publish_checkpoint(a)
        changed = {c.tinker_path: c for c in (await rest.list_user_checkpoints()).checkpoints}
        assert changed[a].public and changed[a].expires_at is not None
        await rest.unpublish_checkpoint(a)
        await rest.set_checkpoint_ttl(a, None)
        await rest.delete_checkpoint(a)
        remaining = {c.tinker_path for c in (await rest.list_checkpoints(job)).checkpoints}
        assert a not in remaining and b in remaining
        with pytest.raises(NotFoundError):
            await rest.delete_checkpoint(a)
        with pytest.raises(NotFoundError):
            await rest.get_training_run("someone-elses-run")
        with pytest.raises(ValueError):
            await rest.delete_checkpoint("step-1")  # not a tinker:// path

        assert service.session_id in (await rest.list_sessions()).sessions
        session = await rest.get_session(service.session_id or "")
        assert tc.model_id in session.training_run_ids


def test_the_facade() -> None:
    with (
        LocalTrainer("null", **FAST_TRAINER) as trainer,
        RestClient(trainer.base_url, trainer.api_key, config=FAST_CLIENT) as rest,
    ):
        runs = rest.list_training_runs(limit=5)
        assert runs.cursor.limit == 5
        with pytest.raises(ValueError, match="limit"):
            rest.list_training_runs(limit=0)


@pytest.mark.asyncio
async def test_weights_info_and_copy_weights(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient
) -> None:
    tc = await service.create_lora_training_client(BASE_MODEL, rank=4, train_unembed=False)
    await tc.forward_backward(batch(1), "cross_entropy")
    await tc.optim_step(ADAM)
    await tc.save_state("a")
    base = await tc.save_weights_for_sampler_ext("s", checkpoint_type="base")
    delta = await tc.save_weights_for_sampler_ext("d", checkpoint_type="delta")
    job = trainer.job_id
    a = f"tinker://{job}/weights/a"

    async with AsyncRestClient(trainer.base_url, trainer.api_key, config=FAST_CLIENT) as rest:
        info = await rest.get_weights_info_by_tinker_path(a)
        assert info.base_model == BASE_MODEL and info.is_lora and info.lora_rank == 4
        assert info.train_unembed is False and info.train_mlp and info.train_attn

        copied = await rest.copy_weights(a, "proj-archive", ttl_seconds=7200)
        run, segment, name = copied.removeprefix("tinker://").split("/")
        assert run.startswith("copy-") and run != job and (segment, name) == ("weights", "a")
        assert await rest.get_weights_info_by_tinker_path(copied) == info
        await rest.delete_checkpoint(a)  # the copy shares files, and outlives the source
        resumed = await service.create_training_client_from_state(copied)
        assert (await resumed.get_info()).lora_rank == 4
        # A copied sampler export samples like its source.
        source = f"tinker://{job}/sampler_weights/{base.snapshot_name}"
        sampler_copy = await rest.copy_weights(source, "proj-archive")
        prompt, params = tinker.ModelInput.from_ints([1, 2, 3]), tinker.SamplingParams(seed=1)
        samples = [
            await (await service.create_sampling_client(model_path=path)).sample(prompt, 1, params)
            for path in (source, sampler_copy)
        ]
        assert samples[0].sequences[0].tokens == samples[1].sequences[0].tokens

        with pytest.raises(NotFoundError, match="tinker_path: no state checkpoint named 'a'"):
            await rest.get_weights_info_by_tinker_path(a)
        with pytest.raises(BadRequestError, match=r"tinker_path: .*not allowed"):
            await rest.get_weights_info_by_tinker_path(f"tinker://{job}/weights/..")
        sampler_path = f"tinker://{job}/sampler_weights/{delta.snapshot_name}"
        with pytest.raises(BadRequestError, match="is a delta on sampler export"):
            await rest.copy_weights(sampler_path, "proj")
        with pytest.raises(BadRequestError, match=r"ttl_seconds must be an integer in \[3600, "):
            await rest.copy_weights(copied, "proj", ttl_seconds=60)
        with pytest.raises(ValueError, match="destination_project_id"):
            await rest.copy_weights(copied)

    # A request retried with its idempotency key answers the copy it already made.
    await tc.save_state("b")
    url = f"{trainer.base_url}{endpoints.COPY_WEIGHTS.path}"
    body = {"source_path": f"tinker://{job}/weights/b", "destination_project_id": "p"}
    async with aiohttp.ClientSession(headers={"X-API-Key": trainer.api_key}) as http:

        async def copy(key: str) -> str:
            async with http.post(url, json=body, headers={"X-Idempotency-Key": key}) as answer:
                assert answer.status == 200
                path: str = (await answer.json())["tinker_path"]
                return path

        first = await copy("k1")
        assert await copy("k1") == first
        assert await copy("k2") != first

