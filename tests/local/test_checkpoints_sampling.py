"""save_state / load_state / sampler exports / TTL over the wire, and tinker sampling."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from firetitan._checkpoint_paths import CheckpointRef

from .conftest import TrainerFactory
from .helpers import BASE_MODEL, Api, forward_body, optim_body

pytestmark = pytest.mark.asyncio


def save_body(model: str, seq: int, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_id": model,
        "path": path,
        "seq_id": seq,
        "overwrite": False,
        "type": "save_weights",
        **extra,
    }


def load_body(model: str, seq: int, path: str, optimizer: bool = True) -> dict[str, Any]:
    return {
        "model_id": model,
        "path": path,
        "optimizer": optimizer,
        "seq_id": seq,
        "type": "load_weights",
    }


def sampler_body(model: str, seq: int, path: str, checkpoint_type: str) -> dict[str, Any]:
    return {
        "model_id": model,
        "path": path,
        "seq_id": seq,
        "type": "save_weights_for_sampler",
        "checkpoint_type": checkpoint_type,
    }


async def logprobs(api: Api, model: str, seq: int) -> list[float]:
    result = await api.result(await api.submit("forward", forward_body(model, seq)))
    values: list[float] = result["loss_fn_outputs"][0]["logprobs"]["data"]
    return values


async def test_save_list_and_load_back(trainer_model: tuple[Any, Api, str]) -> None:
    trainer, api, model = trainer_model
    await api.submit("optim_step", optim_body(model, 1))
    # Pipelined: the load is queued before the save has run, and must still find it.
    save = await api.submit("save_weights", save_body(model, 2, "step-1"))
    await api.submit("optim_step", optim_body(model, 3))
    load = await api.submit("load_weights", load_body(model, 4, "step-1"))
    assert await api.result(save) == {"type": "save_weights", "path": "step-1"}
    assert (await api.result(load))["path"] == "step-1"
    saved = await logprobs(api, model, 5)
    assert await api.get("list_checkpoints") == (200, {"checkpoints": ["step-1"]})
    # The same checkpoint through its cross_job:// name, after training moved on.
    await api.submit("optim_step", optim_body(model, 6))
    cross = f"cross_job://{trainer.job_id}/step-1"
    assert await api.result(await api.submit("load_weights", load_body(model, 7, cross)))
    assert await logprobs(api, model, 8) == saved


async def test_list_checkpoints_is_sorted_naturally(trainer_model: tuple[Any, Api, str]) -> None:
    _trainer, api, model = trainer_model
    for seq, name in enumerate(["step-10", "step-2", "step-1"], start=1):
        await api.result(await api.submit("save_weights", save_body(model, seq, name)))
    assert await api.get("list_checkpoints") == (
        200,
        {"checkpoints": ["step-1", "step-2", "step-10"]},
    )


async def test_loading_a_missing_checkpoint_fails_the_future(
    trainer_model: tuple[Any, Api, str],
) -> None:
    _trainer, api, model = trainer_model
    for seq, path in enumerate(["nope", "cross_job://other-job/step-1"], start=1):
        outcome = await api.outcome(await api.submit("load_weights", load_body(model, seq, path)))
        assert outcome["category"] == "user"
        assert outcome["error"].startswith("path: no state checkpoint named")


BAD_NAMES = ["../up", "a/b", "x\x00y", "/etc/passwd", "..", ".hidden", "C:\\x", "tinker://r/w/c"]
BAD_PATHS = [
    *BAD_NAMES,
    "cross_job://job",
    "cross_job://../x/y",
    "cross_job://job/a/b",
    "cross_job:///name",
    "s3://bucket/key",
]


async def test_unsafe_checkpoint_names_are_refused(trainer_model: tuple[Any, Api, str]) -> None:
    trainer, api, model = trainer_model
    seq = 0
    for name in BAD_NAMES:
        seq += 1
        for endpoint, body in (
            ("save_weights", save_body(model, seq, name)),
            ("save_weights_for_sampler", sampler_body(model, seq, name, "base")),
        ):
            status, answer = await api.post(endpoint, body)
            assert status == 422, (endpoint, name, answer)
            assert answer["detail"].startswith("path:")
    for path in BAD_PATHS:
        seq += 1
        status, answer = await api.post("load_weights", load_body(model, seq, path))
        assert status == 422, (path, answer)
        assert answer["detail"].startswith("path:")
    assert trainer.checkpoint_dir is not None
    # Nothing was written outside this job's folder.
    assert sorted(p.name for p in trainer.checkpoint_dir.iterdir()) == [trainer.job_id]
    # And the model's queue moved past all the refused seq_ids without waiting.
    assert "loss_fn_outputs" in await api.poll(
        await api.submit("forward", forward_body(model, seq + 1))
    )


async def test_sampler_exports_base_then_delta(trainer_api: tuple[Any, Api]) -> None:
    trainer, api = trainer_api
    store = trainer.server.store
    model = await api.model()
    # A delta with nothing to diff against falls back to base, and says so.
    first = await api.submit("save_weights_for_sampler", sampler_body(model, 1, "s-1", "delta"))
    assert await api.result(first) == {"type": "save_weights_for_sampler", "path": "s-1"}
    manifest = store.manifest("sampler", CheckpointRef("s-1"))
    assert manifest is not None
    assert manifest.metadata["checkpoint_type"] == "base"
    assert manifest.metadata["requested_checkpoint_type"] == "delta"
    assert "fallback_reason" in manifest.metadata
    await api.submit("optim_step", optim_body(model, 2))
    second = await api.submit("save_weights_for_sampler", sampler_body(model, 3, "s-2", "delta"))
    assert (await api.result(second))["path"] == "s-2"
    manifest = store.manifest("sampler", CheckpointRef("s-2"))
    assert manifest is not None
    assert manifest.metadata["checkpoint_type"] == "delta"
    assert "fallback_reason" not in manifest.metadata
    merged = sampler_body(model, 4, "s-3", "merged_base")
    outcome = await api.outcome(await api.submit("save_weights_for_sampler", merged))
    assert outcome["category"] == "user"
    assert "merged_base" in outcome["error"]


async def test_merged_base_export_over_http(make_trainer: TrainerFactory) -> None:
    pytest.importorskip("firetitan.local.torch", reason="needs the local extra")
    async with make_trainer(engine="torch", size="tiny", device="cpu") as (trainer, api):
        model = await api.model(lora_rank=4)
        merged = sampler_body(model, 1, "merged", "merged_base")
        result = await api.result(await api.submit("save_weights_for_sampler", merged))
        assert result["path"] == "merged"
        manifest = trainer.server.store.manifest("sampler", CheckpointRef("merged"))
        assert manifest is not None
        assert manifest.metadata["checkpoint_type"] == "merged_base"
        assert manifest.metadata["engine"]["format"] != "peft"  # full weights, not an adapter


async def test_ttl_checkpoints_disappear(trainer_model: tuple[Any, Api, str]) -> None:
    trainer, api, model = trainer_model
    await api.result(await api.submit("save_weights", save_body(model, 1, "keep")))
    short = save_body(model, 2, "short-lived", ttl_seconds=1)
    await api.result(await api.submit("save_weights", short))
    assert trainer.checkpoint_dir is not None
    folder = trainer.checkpoint_dir / trainer.job_id / "state" / "short-lived"
    assert folder.is_dir()
    for _ in range(200):
        if not folder.exists():
            break
        await asyncio.sleep(0.05)
    assert not folder.exists()  # the background sweeper deleted it
    assert await api.get("list_checkpoints") == (200, {"checkpoints": ["keep"]})


async def test_sampling_from_an_export(trainer_api: tuple[Any, Api]) -> None:
    trainer, api = trainer_api
    session = await api.session()
    model = await api.model(session)
    await api.result(
        await api.submit("save_weights_for_sampler", sampler_body(model, 1, "s-1", "base"))
    )
    status, created = await api.post(
        "create_sampling_session",
        {
            "session_id": session,
            "sampling_session_seq_id": 0,
            "model_path": "s-1",
            "type": "create_sampling_session",
        },
    )
    assert status == 200
    assert created["type"] == "create_sampling_session"
    sampling_id = created["sampling_session_id"]
    request = {
        "num_samples": 2,
        "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 4, "seed": 7, "temperature": 1.0},
        "sampling_session_id": sampling_id,
        "seq_id": 0,
        "type": "sample",
    }
    headers = {"X-Idempotency-Key": "sample-1"}
    first = await api.submit("asample", request, **headers)
    assert await api.submit("asample", request, **headers) == first
    result = await api.result(first)
    assert len(result["sequences"]) == 2
    for sequence in result["sequences"]:
        assert len(sequence["tokens"]) <= 4
        assert all(lp <= 0 for lp in sequence["logprobs"])
    assert sum(r.kind == "asample" for r in trainer.execution_log) == 1
    # From a base model directly, and a missing export fails the future as a user error.
    base = {**request, "base_model": BASE_MODEL, "seq_id": 1}
    base.pop("sampling_session_id")
    assert "sequences" in await api.result(await api.submit("asample", base))
    missing = {**base, "model_path": "no-such-export"}
    missing.pop("base_model")
    outcome = await api.outcome(await api.submit("asample", missing))
    assert outcome["category"] == "user"
    assert "model_path" in outcome["error"]


async def test_create_via_load(trainer_api: tuple[Any, Api]) -> None:
    """tinker 0.38: a load_weights with session_id + model_seq_id creates the model."""
    trainer, api = trainer_api
    source = await api.model()
    await api.submit("optim_step", optim_body(source, 1))
    await api.result(await api.submit("save_weights", save_body(source, 2, "step-1")))
    expected = await logprobs(api, source, 3)

    session = await api.session()
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "path": "step-1",
        "optimizer": True,
        "type": "load_weights",
    }
    status, ack = await api.post("load_weights", body)
    assert status == 200
    model = f"{session}:train:0"
    assert ack["model_id"] == model
    assert await api.submit("load_weights", body) == ack["request_id"]  # a retry
    assert await api.result(ack["request_id"]) == {
        "type": "load_weights",
        "path": "step-1",
        "model_id": model,
    }
    status, info = await api.post("get_info", {"model_id": model, "type": "get_info"})
    assert status == 200 and info["lora_rank"] == 0
    assert await logprobs(api, model, 1) == expected
    assert [(r.seq_id, r.kind) for r in trainer.execution_log if r.model_id == model] == [
        (0, "load_weights"),
        (1, "forward"),
    ]
    missing = {**body, "model_seq_id": 1, "path": "no-such"}
    outcome = await api.outcome(await api.submit("load_weights", missing))
    assert outcome["category"] == "user"
    assert "no-such" in outcome["error"]
