"""What the trainer does for tinker 0.38 clients, over the wire: protobuf (and zstd)
forward bodies, protobuf results by ``Accept``, ``tinker://`` paths by session, the
sampling endpoints' tinker extras, and the tinker options it refuses. The whole SDK is
driven in ``tests/compat/test_tinker_sdk.py``; this checks the edges one by one."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import tinker
from tinker.proto.response_conv import deserialize_proto_response
from tinker.types import ImageChunk

from firetitan.local import LocalTrainer

from .helpers import BASE_MODEL, Api, executed, optim_body
from .test_tinker_wire import tinker_sends

pytestmark = pytest.mark.asyncio

PROTOBUF = "application/x-protobuf"
FIREWORKS_ACCEPT = "application/x-protobuf, application/json"
TinkerApi = tuple[LocalTrainer, Api]


async def tinker_session(api: Api) -> str:
    body = {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"}
    status, answer = await api.post("create_session", body)
    assert status == 200, answer
    session_id: str = answer["session_id"]
    return session_id


async def post_raw(api: Api, endpoint: str, body: bytes, headers: dict[str, str]) -> Any:
    """POST a non-JSON body; return (status, JSON answer)."""
    all_headers = {"X-API-Key": api.key, **headers}
    async with api.http.post(api.url(endpoint), data=body, headers=all_headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def poll_as(api: Api, request_id: str, accept: str) -> tuple[str, bytes]:
    """Poll until done with an ``Accept`` header; return the content type and body."""
    headers = {"X-API-Key": api.key, "Accept": accept}
    for _ in range(20):
        body = {"request_id": request_id, "allow_metadata_only": True}
        async with api.http.post(api.url("retrieve_future"), json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            raw = await resp.read()
            if resp.content_type == PROTOBUF or b'"try_again"' not in raw:
                return resp.content_type, raw
    raise AssertionError(f"{request_id} still pending")


def sft_datum(tokens: list[int]) -> tinker.Datum:
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64)},
    )


async def tinker_body(
    data: list[tinker.Datum], model: str, seq_id: int, **options: Any
) -> tuple[dict[str, str], bytes]:
    """Headers and body as tinker's own training resource builds them (it runs an event
    loop of its own, so on another thread)."""
    return await asyncio.to_thread(tinker_sends, data, model_id=model, seq_id=seq_id, **options)


async def send_forward(
    api: Api, model: str, seq_id: int, data: list[tinker.Datum], **options: Any
) -> str:
    headers, body = await tinker_body(data, model, seq_id, **options)
    status, ack = await post_raw(api, "forward_backward", body, headers)
    assert status == 200, ack
    assert ack["model_id"] == model
    request_id: str = ack["request_id"]
    return request_id


# --------------------------------------------------------------------------- config


async def test_client_config_sets_tinkers_knobs(trainer_api: TinkerApi) -> None:
    _trainer, api = trainer_api
    status, config = await api.post("client/config", {"sdk_version": "0.38.0"})
    assert status == 200
    parsed = tinker.types.ClientConfigResponse.model_validate(config)
    assert not parsed.proto_compress_fwdbwd
    assert parsed.sample_use_retrieve_futures
    assert parsed.custom_loss_server_side
    assert parsed.sample_join_sampling_session
    assert parsed.fwdbwd_max_chunk_len == 1024
    assert parsed.fwdbwd_max_chunk_bytes_count <= 5_000_000


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
async def test_protobuf_forward_calls_run_in_order(trainer_api: TinkerApi, compress: bool) -> None:
    trainer, api = trainer_api
    model = await api.model(await tinker_session(api))
    data = [sft_datum([1, 2, 3, 4]), sft_datum([5, 6, 7])]
    # Out of order, as concurrent chunks may arrive.
    forward = await send_forward(api, model, 2, data, forward_only=True, compress=compress)
    backward = await send_forward(api, model, 1, data, compress=compress)
    assert await send_forward(api, model, 1, data, compress=compress) == backward  # a retry

    content_type, raw = await poll_as(api, backward, PROTOBUF)
    assert content_type == PROTOBUF
    output = deserialize_proto_response(raw, tinker.ForwardBackwardOutput)
    assert isinstance(output, tinker.ForwardBackwardOutput)
    assert [len(o["logprobs"].tolist()) for o in output.loss_fn_outputs] == [3, 2]
    # The same result, in JSON, for a client that lists JSON.
    as_json = await api.result(backward)
    assert as_json["metrics"] == pytest.approx(output.metrics)
    content_type, _raw = await poll_as(api, forward, FIREWORKS_ACCEPT)
    assert content_type == "application/json"
    assert executed(trainer, model) == [
        (0, "create_model"),
        (1, "forward_backward"),
        (2, "forward"),
    ]


async def test_invalid_protobuf_data_fails_in_its_turn(trainer_api: TinkerApi) -> None:
    trainer, api = trainer_api
    model = await api.model(await tinker_session(api))
    image = tinker.Datum(
        model_input=tinker.ModelInput(
            chunks=[ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]
        ),
        loss_fn_inputs={"target_tokens": np.zeros(4, dtype=np.int64)},
    )
    refused = await send_forward(api, model, 1, [image])  # accepted: the POST is fine
    after = await send_forward(api, model, 2, [sft_datum([1, 2, 3])])
    failure = await api.outcome(refused)
    assert failure["category"] == "user"
    assert "image" in failure["error"]
    assert "forward_backward_input.data[0].model_input.chunks[0]" in failure["error"]
    await api.result(after)
    assert executed(trainer, model)[1:] == [(1, "forward_backward"), (2, "forward_backward")]


async def test_bodies_the_trainer_cannot_read(trainer_api: TinkerApi) -> None:
    _trainer, api = trainer_api
    model = await api.model(await tinker_session(api))
    headers, body = await tinker_body([sft_datum([1, 2, 3])], model, 1)
    status, answer = await post_raw(
        api, "forward_backward", body, {**headers, "Content-Encoding": "gzip"}
    )
    assert status == 415, answer
    assert "gzip" in answer["detail"]
    bad_zstd = {**headers, "Content-Encoding": "zstd"}
    status, answer = await post_raw(api, "forward_backward", b"not zstd", bad_zstd)
    assert status == 400, answer
    status, answer = await post_raw(api, "forward_backward", b"\xff\xff", headers)
    assert status == 400, answer
    assert "ForwardBackwardRequest" in answer["detail"]


# --------------------------------------------------------------------------- paths


def save_body(model: str, seq_id: int, name: str) -> dict[str, Any]:
    return {"model_id": model, "path": name, "seq_id": seq_id, "type": "save_weights"}


async def test_paths_follow_the_sessions_client(trainer_api: TinkerApi) -> None:
    trainer, api = trainer_api
    tinker_model = await api.model(await tinker_session(api))
    fireworks_model = await api.model(await api.session())
    saved = await api.result(await api.submit("save_weights", save_body(tinker_model, 1, "t-1")))
    assert saved["path"] == f"tinker://{trainer.job_id}/weights/t-1"
    saved = await api.result(await api.submit("save_weights", save_body(fireworks_model, 1, "f-1")))
    assert saved["path"] == "f-1"
    # Either grammar loads, whoever sends it.
    for seq_id, path in [(2, f"tinker://{trainer.job_id}/weights/f-1"), (3, "t-1")]:
        body = {
            "model_id": fireworks_model,
            "path": path,
            "optimizer": True,
            "seq_id": seq_id,
            "type": "load_weights",
        }
        assert (await api.result(await api.submit("load_weights", body)))["path"] == path
    sampler_path = f"tinker://{trainer.job_id}/sampler_weights/t-1"
    wrong_kind = {**body, "seq_id": 4, "path": sampler_path}
    status, answer = await api.post("load_weights", wrong_kind)
    assert status == 422
    assert "sampler_weights" in answer["detail"]


# --------------------------------------------------------------------------- sampling


def sample_body(sampling_id: str, seq_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "num_samples": 2,
        "prompt": {"chunks": [{"tokens": [1, 2, 3, 4, 5], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 3, "seed": 1},
        "sampling_session_id": sampling_id,
        "seq_id": seq_id,
        "type": "sample",
        **extra,
    }


def sampling_session_body(session: str, **source: str) -> dict[str, Any]:
    """A create_sampling_session body; ``source``: the base model, or a model_path."""
    return {
        "session_id": session,
        "sampling_session_seq_id": 0,
        **(source or {"base_model": BASE_MODEL}),
        "type": "create_sampling_session",
    }


async def base_sampler(api: Api) -> str:
    """A new tinker session's sampling session on the base model; its id."""
    body = sampling_session_body(await tinker_session(api))
    status, answer = await api.post("create_sampling_session", body)
    assert status == 200, answer
    sampling_id: str = answer["sampling_session_id"]
    return sampling_id


async def test_pathless_export_and_its_sampler(trainer_api: TinkerApi) -> None:
    trainer, api = trainer_api
    session = await tinker_session(api)
    model = await api.model(session)
    body = {
        "model_id": model,
        "seq_id": 1,
        "sampling_session_seq_id": 0,
        "kind": "snapshot",
        "type": "save_weights_for_sampler",
    }
    saved = await api.result(await api.submit("save_weights_for_sampler", body))
    sampling_id = saved["sampling_session_id"]
    assert saved["path"].startswith(f"tinker://{trainer.job_id}/sampler_weights/")
    status, sampler = await api.get(f"samplers/{sampling_id}")
    assert status == 200
    assert sampler == {
        "sampler_id": sampling_id,
        "base_model": BASE_MODEL,
        "model_path": saved["path"],
    }
    assert (await api.get("samplers/samp-unknown"))[0] == 404

    status, ack = await api.post("asample", sample_body(sampling_id, 0))
    assert status == 200
    ids = ack["sample_sequence_ids"]
    assert len(ids) == len(set(ids)) == 2
    assert (await api.post("asample", sample_body(sampling_id, 0)))[1] == ack  # a retry
    content_type, raw = await poll_as(api, ack["request_id"], PROTOBUF)
    assert content_type == PROTOBUF
    response = deserialize_proto_response(raw, tinker.SampleResponse)
    assert isinstance(response, tinker.SampleResponse)
    assert len(response.sequences) == 2


async def test_prompt_logprobs_last_n(trainer_api: TinkerApi) -> None:
    _trainer, api = trainer_api
    sampling_id = await base_sampler(api)
    body = sample_body(sampling_id, 0, prompt_logprobs=True, prompt_logprobs_last_n=2)
    result = await api.result(await api.submit("asample", body))
    scored = result["prompt_logprobs"]
    assert len(scored) == 5
    assert scored[:3] == [None, None, None]
    assert all(v is not None for v in scored[3:])
    too_many = sample_body(sampling_id, 1, prompt_logprobs=True, prompt_logprobs_last_n=5)
    failure = await api.outcome(await api.submit("asample", too_many))
    assert failure["category"] == "user"
    assert "prompt_logprobs_last_n" in failure["error"]


async def test_completion_queue_per_sampling_session_and_clone(trainer_api: TinkerApi) -> None:
    _trainer, api = trainer_api
    sampling_id = await base_sampler(api)
    joined = [
        (await api.post("join_sampling_session", {"sampling_session_id": sampling_id}))[1]
        for _ in range(2)
    ]
    assert [j["client_counter"] for j in joined] == [1, 2]  # 0 is the original client

    def poll(clone: int, cursor: int, timeout: float | None = None) -> dict[str, Any]:
        target = {"sampling_session_id": sampling_id, "cloned_sampler_id": clone}
        return {"target": target, "prev_cursor": cursor, "timeout": timeout}

    first = (await api.post("asample", sample_body(sampling_id, 1)))[1]["request_id"]
    clone = (await api.post("asample", sample_body(sampling_id, 2_000_000_001)))[1]["request_id"]
    status, answer = await api.post("retrieve_futures", poll(0, 0))
    assert status == 200
    assert answer["completions"] == [{"state": "finished", "request_id": first}]
    assert (await api.post("retrieve_futures", poll(0, answer["cursor"], 0)))[1] == {
        "completions": [],
        "cursor": answer["cursor"],
    }
    clone_answer = (await api.post("retrieve_futures", poll(2, 0)))[1]
    assert [c["request_id"] for c in clone_answer["completions"]] == [clone]
    assert "sequences" in await api.result(first)  # then fetched as before
    unknown = {"target": {"sampling_session_id": "samp-x"}, "prev_cursor": 0}
    assert (await api.post("retrieve_futures", unknown))[0] == 404


async def test_sampling_a_state_checkpoint_is_refused(trainer_api: TinkerApi) -> None:
    trainer, api = trainer_api
    create = sampling_session_body(
        await tinker_session(api), model_path=f"tinker://{trainer.job_id}/weights/step-1"
    )
    status, answer = await api.post("create_sampling_session", create)
    assert status == 422
    assert "sampler_weights" in answer["detail"]


# --------------------------------------------------------------------------- options


async def test_options_the_trainer_cannot_honour_are_refused(trainer_api: TinkerApi) -> None:
    _trainer, api = trainer_api
    session = await tinker_session(api)
    dimuon = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": BASE_MODEL,
        "lora_config": {"rank": 4},
        "optimizer_config": {"type": "dimuon", "version": 1},
        "type": "create_model",
    }
    status, answer = await api.post("create_model", dimuon)
    assert status == 400
    assert "optimizer_config.type" in answer["detail"]
    adamw = {**dimuon, "optimizer_config": {"type": "adamw"}}
    model = (await api.post("create_model", adamw))[1]["model_id"]
    muon_step = {**optim_body(model, 1), "optimizer_params": {"type": "dimuon"}}
    status, answer = await api.post("optim_step", muon_step)
    assert status == 400
    assert "optimizer_params" in answer["detail"]
    # The refused seq_id is a hole: the next one runs.
    await api.result(await api.submit("optim_step", optim_body(model, 2)))
