"""Every training-client method against the local trainer (null engine)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import tinker
from shared import Surface, connect, proxied

from firetitan import (
    AsyncAPIFuture,
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    ClientClosedError,
    FutureState,
    GradAccNormalization,
    RequestFailedError,
    SaveSamplerResult,
)
from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_CLIENT, batch, chunked_config, datum, executed


@pytest.mark.asyncio
async def test_forward_forward_backward_optim_step(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient
) -> None:
    tc = await service.create_training_client(BASE_MODEL, user_metadata={"run": "t"})
    assert tc.model_id and tc.base_model == BASE_MODEL and tc.lora_rank == 0
    assert not tc.is_lora and not tc.base_only
    fwd = tc.forward(batch(3), "cross_entropy")
    fb = tc.forward_backward(batch(3), "cross_entropy")
    opt = tc.optim_step(ADAM, grad_accumulation_normalization="NUM_LOSS_TOKENS")
    assert {f.state for f in (fwd, fb, opt)} <= {FutureState.QUEUED, FutureState.SENDING}
    out, back, step = await fwd, await fb, await opt
    assert fwd.state is FutureState.DONE and fwd.request_id is not None
    assert len(out.loss_fn_outputs) == 3
    assert out.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (8,)
    assert out.metrics["response_tokens"] == 24.0 and "loss:sum" in out.metrics
    assert back.metrics["response_tokens"] == 24.0
    assert step.metrics is not None
    assert executed(trainer, tc.model_id) == [
        (1, "forward"),
        (2, "forward_backward"),
        (3, "optim_step"),
    ]


@pytest.mark.asyncio
async def test_optim_step_accepts_the_enum_and_refuses_unknown_values(
    tc: AsyncFiretitanTrainingClient,
) -> None:
    await tc.forward_backward(batch(1), "cross_entropy")
    await tc.optim_step(ADAM, GradAccNormalization.NUM_SEQUENCES)
    with pytest.raises(ValueError, match="num_loss_tokens"):
        tc.optim_step(ADAM, "per_token")
    with pytest.raises(TypeError, match="AdamParams"):
        tc.optim_step({"learning_rate": 1e-3})  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_invalid_arguments_raise_at_the_call_site(
    tc: AsyncFiretitanTrainingClient,
) -> None:
    with pytest.raises(ValueError, match="empty"):
        tc.forward([], "cross_entropy")
    with pytest.raises(TypeError, match=r"data\[1\]"):
        tc.forward([datum(), "x"], "cross_entropy")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="loss_fn"):
        tc.forward_backward(batch(1), "")
    with pytest.raises(ValueError, match="not allowed"):
        tc.save_state("../escape")
    with pytest.raises(ValueError, match="ttl_seconds"):
        tc.save_state("ok", ttl_seconds=0)
    with pytest.raises(ValueError, match="scheme"):
        tc.load_state("s3://bucket/weights/x")
    with pytest.raises(ValueError, match="checkpoint_type"):
        tc.save_weights_for_sampler("s", checkpoint_type="full")
    with pytest.raises(ValueError, match="deadline"):
        tc.optim_step(ADAM, deadline=0)
    # None of them left anything pending behind.
    await tc.unload_model()


@pytest.mark.asyncio
async def test_chunked_batches_take_contiguous_seq_ids(trainer: LocalTrainer) -> None:
    async with connect(trainer.base_url, trainer.api_key, chunked_config(2)) as service:
        tc = await service.create_training_client(BASE_MODEL)
        data = batch(5)
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(ADAM)
        out = await fb
        await opt
        assert len(fb.request_ids) == 3
        assert len(out.loss_fn_outputs) == 5
        assert out.metrics["response_tokens"] == 40.0
        # Outputs come back in data order although chunks were uploaded concurrently.
        single = await tc.forward(data[3:4], "cross_entropy")
        assert single.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (8,)
        log = executed(trainer, tc.model_id)
        assert [s for s, _ in log] == [1, 2, 3, 4, 5]
        assert [k for _, k in log] == ["forward_backward"] * 3 + ["optim_step", "forward"]


@pytest.mark.asyncio
async def test_large_batches_are_encoded_off_the_loop(trainer: LocalTrainer) -> None:
    config = FAST_CLIENT.evolve(limits=FAST_CLIENT.limits.__class__(offload_bytes=10))
    async with connect(trainer.base_url, trainer.api_key, config) as service:
        tc = await service.create_training_client(BASE_MODEL)
        out = await tc.forward(batch(4), "cross_entropy")
        assert len(out.loss_fn_outputs) == 4
        with pytest.raises(ValueError):
            # A non-finite weight cannot be encoded; off the loop it fails the future.
            bad = datum()
            bad.loss_fn_inputs["weights"].to_numpy()[0] = float("nan")
            await tc.forward([bad], "cross_entropy")
        # Nothing was sent for it, so no seq_id was spent.
        await tc.optim_step(ADAM)
        assert [s for s, _ in executed(trainer, tc.model_id)] == [1, 2]


# The tests taking `surface` run through the async core and through the facade.


@pytest.mark.asyncio
async def test_checkpoints_save_list_load_and_resolve(
    null_trainer: LocalTrainer, surface: Surface, any_model: Any
) -> None:
    call, tc = surface.call, any_model
    await call(tc.forward_backward, batch(2), "cross_entropy")
    await call(tc.optim_step, ADAM)
    saved = await call(tc.save_state, "train_state_step_1")
    assert saved.path == "train_state_step_1"
    await call(tc.save_state, "step-2", ttl_seconds=3600)
    assert await call(tc.list_checkpoints) == ["step-2", "train_state_step_1"]
    await call(tc.load_state, tc.resolve_checkpoint_path(" step-2 "))
    await call(tc.load_state_with_optimizer, saved.path)
    assert tc.resolve_checkpoint_path("step-4", source_job_id="job-a") == "cross_job://job-a/step-4"
    own = tc.resolve_checkpoint_path("step-2", source_job_id=null_trainer.job_id)
    await call(tc.load_state_with_optimizer, own)
    with pytest.raises(RequestFailedError) as info:
        await call(tc.load_state, "never-saved")
    assert info.value.category == "user"
    with pytest.raises(ValueError):
        tc.resolve_checkpoint_path("a/b")


@pytest.mark.asyncio
async def test_peer_path_forms_and_training_clients_from_state(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient
) -> None:
    tc = await service.create_lora_training_client(BASE_MODEL, rank=4)
    await tc.forward_backward(batch(2), "cross_entropy")
    await tc.optim_step(ADAM)
    await tc.save_state("s1", overwrite=True, user_metadata={"note": "n"}, timeout=60)
    job = trainer.job_id
    # tinker's and Fireworks' forms of the same checkpoint path
    await tc.load_state(f"tinker://{job}/weights/s1")
    await tc.load_state_with_optimizer(f"acme/{job}/s1")
    manifest = trainer.server.store.manifest("state", CheckpointRef("s1"))
    assert manifest is not None and manifest.metadata["checkpoint_user_metadata"] == {"note": "n"}
    # A name this model saved is refused without overwrite (tinker's default), and kept as
    # it was; overwrite=True replaces it, metadata included.
    with pytest.raises(RequestFailedError) as refused:
        await tc.save_state("s1", user_metadata={"note": "second"})
    assert refused.value.category == "user"
    assert str(refused.value).startswith(
        "save_state: this model already saved a checkpoint named 's1'; pass overwrite=True"
    )
    kept = trainer.server.store.manifest("state", CheckpointRef("s1"))
    assert kept is not None and kept.created_at == manifest.created_at
    await tc.save_state("s1", overwrite=True)
    replaced = trainer.server.store.manifest("state", CheckpointRef("s1"))
    assert replaced is not None and "checkpoint_user_metadata" not in replaced.metadata

    fresh = await service.create_training_client_from_state(f"tinker://{job}/weights/s1")
    resumed = await service.create_training_client_from_state_with_optimizer(
        "s1", user_metadata={"run": "resumed"}
    )
    for client in (fresh, resumed):
        assert client.model_id != tc.model_id
        assert client.base_model == BASE_MODEL and client.lora_rank == 4
        await client.forward_backward(batch(1), "cross_entropy")
    # One trainer job is one namespace: a run resumed from "s1" may save under the names
    # its first run used (tinker keeps each run's apart; here the later one replaces).
    await resumed.save_state("s1")
    latest = trainer.server.store.manifest("state", CheckpointRef("s1"))
    assert latest is not None and latest.model_id == resumed.model_id
    assert executed(trainer, resumed.model_id)[0] == (0, "load_weights")
    with pytest.raises(RequestFailedError):
        await service.create_training_client_from_state("never-saved")
    with pytest.raises(ValueError):
        await service.create_training_client_from_state("s3://bucket/x")
    with pytest.raises(ValueError, match="not both"):
        tc.save_state("s2", timeout=1, deadline=1)


@pytest.mark.asyncio
async def test_sampler_exports_name_and_checkpoint_type(trainer: LocalTrainer) -> None:
    async with proxied(trainer) as (proxy, service):
        tc = await service.create_training_client(BASE_MODEL)
        suffix = tc.session_id
        assert len(suffix) == 8 and int(suffix, 16) >= 0
        first = await tc.save_weights_for_sampler_ext("step-1")
        assert first == SaveSamplerResult(path=f"step-1-{suffix}", snapshot_name=f"step-1-{suffix}")
        second = await tc.save_weights_for_sampler("step-2")
        assert second.path == f"step-2-{suffix}"
        third = await tc.save_weights_for_sampler_ext("step-3", checkpoint_type=" BASE ")
        assert third.snapshot_name == f"step-3-{suffix}"
        sent = [r.body for r in proxy.requests_to("/api/v1/save_weights_for_sampler")]
        # Full-parameter: base first, delta afterwards; an explicit type wins.
        assert [b["checkpoint_type"] for b in sent] == ["base", "delta", "base"]
        assert [b["path"] for b in sent] == [f"step-{i}-{suffix}" for i in (1, 2, 3)]


@pytest.mark.asyncio
async def test_lora_exports_are_always_base(service: AsyncFiretitanServiceClient) -> None:
    tc = await service.create_lora_training_client(BASE_MODEL, rank=8)
    assert tc.is_lora and tc.lora_rank == 8
    assert tc._checkpoint_type(None) == "base"
    await tc.save_weights_for_sampler_ext("a")
    assert tc._checkpoint_type(None) == "base"
    full = await service.create_training_client(BASE_MODEL, lora_rank=0, seed=3)
    assert full._checkpoint_type(None) == "base"
    future = full.save_weights_for_sampler("a")
    assert full._checkpoint_type(None) == "delta"  # an export is in flight
    await future
    assert full._checkpoint_type("Delta") == "delta"


@pytest.mark.asyncio
async def test_lora_and_base_only_clients(surface: Surface, any_service: Any) -> None:
    call = surface.call
    # tinker's positional order: base_model, rank, seed.
    lora = await call(any_service.create_lora_training_client, BASE_MODEL, 4, 1, alpha=8)
    info = await call(lora.get_info)
    assert info.model_id == lora.model_id and info.is_lora and info.lora_rank == 4
    await call(lora.forward_backward, batch(2), "cross_entropy")
    await call(lora.optim_step, ADAM)
    base = await call(any_service.create_base_training_client, BASE_MODEL)
    assert base.base_only
    reference = await call(base.forward, batch(2), "cross_entropy")
    assert len(reference.loss_fn_outputs) == 2
    with pytest.raises(RequestFailedError) as info_error:
        await call(base.forward_backward, batch(1), "cross_entropy")
    assert info_error.value.category == "user"


def test_create_lora_training_client_takes_tinkers_positional_parameters() -> None:
    tinkers = inspect.signature(tinker.ServiceClient.create_lora_training_client).parameters
    ours = inspect.signature(AsyncFiretitanServiceClient.create_lora_training_client).parameters
    positional = [name for name, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(tinkers)[: len(positional)]  # tinker's optimizer= is not served


@pytest.mark.asyncio
async def test_duplicate_training_client_is_refused_before_any_request(
    null_trainer: LocalTrainer, surface: Surface, any_service: Any
) -> None:
    call, create = surface.call, any_service.create_training_client
    await call(create, BASE_MODEL)
    models_before = {r.model_id for r in null_trainer.execution_log}
    with pytest.raises(ValueError, match="already exists"):
        await call(create, BASE_MODEL, lora_rank=0)
    assert {r.model_id for r in null_trainer.execution_log} == models_before
    # Other options make another model.
    await call(create, BASE_MODEL, seed=1)
    await call(any_service.create_lora_training_client, BASE_MODEL, rank=8)
    with pytest.raises(ValueError, match="already exists"):
        await call(create, BASE_MODEL, lora_rank=8)


@pytest.mark.asyncio
async def test_unload_model_finishes_pending_work_first(
    trainer: LocalTrainer, service: AsyncFiretitanServiceClient, tc: AsyncFiretitanTrainingClient
) -> None:
    pending: list[AsyncAPIFuture[Any]] = [
        tc.forward_backward(batch(2, seed=i), "cross_entropy") for i in range(3)
    ]
    pending.append(tc.optim_step(ADAM))
    response = await tc.unload_model()
    assert response.model_id == tc.model_id
    assert all(f.state is FutureState.DONE for f in pending)
    with pytest.raises(ClientClosedError, match="unloaded"):
        tc.forward(batch(1), "cross_entropy")
    # Its options are free again.
    again = await service.create_training_client(BASE_MODEL)
    assert again.model_id != tc.model_id


@pytest.mark.asyncio
async def test_server_capabilities_and_sampling_client(
    service: AsyncFiretitanServiceClient,
) -> None:
    capabilities = await service.get_server_capabilities()
    assert any(m.model_name == BASE_MODEL for m in capabilities.supported_models)
    tc = await service.create_training_client(BASE_MODEL)
    sampler = await tc.save_weights_and_get_sampling_client()
    assert sampler.model_path == f"sampler-1-{tc.session_id}"
    response = await sampler.sample(
        tinker.ModelInput.from_ints([1, 2, 3]), 2, tinker.SamplingParams(max_tokens=5, seed=1)
    )
    assert len(response.sequences) == 2
    assert all(len(seq.tokens) <= 5 for seq in response.sequences)
    logprobs = await sampler.compute_logprobs(tinker.ModelInput.from_ints([4, 5, 6, 7]))
    assert logprobs[0] is None and len(logprobs) == 4
    base_sampler = await service.create_sampling_client(base_model=BASE_MODEL)
    assert base_sampler.base_model == BASE_MODEL
    assert (
        len(
            (
                await base_sampler.sample(
                    tinker.ModelInput.from_ints([1]), 1, tinker.SamplingParams(max_tokens=2)
                )
            ).sequences
        )
        == 1
    )
