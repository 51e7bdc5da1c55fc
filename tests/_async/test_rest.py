"""The REST client (async core and facade) against the local trainer: training runs,
checkpoints (list, TTL, publish, delete) and sessions, in tinker's types."""

from __future__ import annotations

import pytest

from firetitan import AsyncFiretitanServiceClient, AsyncRestClient, NotFoundError, RestClient
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
