"""retrieve_future (long-poll, re-polls, eviction), sessions and the service endpoints."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from firetitan.local.null_engine import NullEngine

from .conftest import ModelFactory, TrainerFactory
from .helpers import BASE_MODEL, Api, forward_body

pytestmark = pytest.mark.asyncio


async def test_long_poll_answers_try_again_after_the_hold(make_model: ModelFactory) -> None:
    async with make_model(long_poll_seconds=0.2) as (_trainer, api, model):
        pending = await api.submit("forward", forward_body(model, 2))  # seq_id 1 is missing
        answer = await api.poll(pending)
        assert answer == {
            "type": "try_again",
            "request_id": pending,
            "queue_state": "active",
        }
        await api.submit("forward", forward_body(model, 1))
        assert "loss_fn_outputs" in await api.result(pending)


async def test_long_poll_returns_as_soon_as_the_result_is_ready(
    make_model: ModelFactory,
) -> None:
    # A hold far longer than the test timeout: only an early wake-up can pass.
    async with make_model(long_poll_seconds=600.0) as (_trainer, api, model):
        pending = await api.submit("forward", forward_body(model, 2))
        poll = asyncio.ensure_future(api.poll(pending))
        await asyncio.sleep(0.05)
        assert not poll.done()
        await api.submit("forward", forward_body(model, 1))
        assert "loss_fn_outputs" in await poll


async def test_results_can_be_polled_again(trainer_model: tuple[Any, Api, str]) -> None:
    _trainer, api, model = trainer_model
    request_id = await api.submit("forward", forward_body(model, 1))
    first = await api.result(request_id)
    assert await api.result(request_id) == first
    assert await api.result(request_id) == first


async def test_evicted_results_answer_410(make_model: ModelFactory) -> None:
    async with make_model(max_retained_results=2) as (_trainer, api, model):
        ids = [await api.submit("forward", forward_body(model, seq)) for seq in (1, 2, 3)]
        await api.result(ids[2])
        status, answer = await api.post("retrieve_future", {"request_id": ids[0]})
        assert status == 410
        assert answer["error_class"] == "GoneError"
        assert "no longer kept" in answer["detail"]
        await api.result(ids[1])  # the newest ones are kept


async def test_results_expire_after_the_retention_time(make_model: ModelFactory) -> None:
    async with make_model(result_retention_seconds=0.1) as (_trainer, api, model):
        request_id = await api.submit("forward", forward_body(model, 1))
        await api.result(request_id)
        for _ in range(100):
            status, _answer = await api.post("retrieve_future", {"request_id": request_id})
            if status == 410:
                break
            await asyncio.sleep(0.05)
        assert status == 410


async def test_silent_sessions_expire_and_their_models_unload(
    make_trainer: TrainerFactory,
) -> None:
    async with make_trainer(session_expiry_seconds=0.3) as (trainer, api):
        session = await api.session()
        model = await api.model(session)
        assert isinstance(trainer.engine, NullEngine)
        assert trainer.engine.model_ids() == [model]
        for _ in range(100):
            if not trainer.engine.model_ids():
                break
            await asyncio.sleep(0.05)
        assert trainer.engine.model_ids() == []
        assert any(r.kind == "unload_model" and r.model_id == model for r in trainer.execution_log)
        status, answer = await api.post("get_info", {"model_id": model, "type": "get_info"})
        assert status == 404
        assert "model_id" in answer["detail"]
        # tinker stops its heartbeat loop on 410.
        status, answer = await api.post("session_heartbeat", {"session_id": session})
        assert status == 410
        assert "ended" in answer["detail"]


async def test_heartbeats_keep_a_session_alive(make_trainer: TrainerFactory) -> None:
    async with make_trainer(session_expiry_seconds=1.0) as (trainer, api):
        session = await api.session()
        model = await api.model(session)
        for _ in range(20):  # 2 s of heartbeats, twice the expiry
            status, answer = await api.post(
                "session_heartbeat", {"session_id": session, "type": "session_heartbeat"}
            )
            assert (status, answer) == (200, {"type": "session_heartbeat"})
            await asyncio.sleep(0.1)
        status, info = await api.post("get_info", {"model_id": model, "type": "get_info"})
        assert status == 200
        assert info["model_id"] == model
        assert info["model_data"]["model_name"] == BASE_MODEL
        assert trainer.engine.model_ids() == [model]  # type: ignore[attr-defined]


async def test_finishing_a_session_unloads_its_models(trainer_api: tuple[Any, Api]) -> None:
    trainer, api = trainer_api
    session = await api.session()
    model = await api.model(session)
    body = {"reason": {"type": "success"}, "detail": None}
    assert await api.post(f"sessions/{session}/finish", body) == (200, {})
    assert await api.post(f"sessions/{session}/finish", body) == (200, {})
    for _ in range(100):
        if not trainer.engine.model_ids():
            break
        await asyncio.sleep(0.02)
    assert trainer.engine.model_ids() == []
    status, _answer = await api.post("forward", forward_body(model, 1))
    assert status == 404


async def test_unloaded_models_refuse_work_and_queued_work_fails(
    trainer_model: tuple[Any, Api, str],
) -> None:
    _trainer, api, model = trainer_model
    queued = await api.submit("forward", forward_body(model, 2))  # waits for seq_id 1
    unload = await api.submit("unload_model", {"model_id": model, "type": "unload_model"})
    assert await api.result(unload) == {"type": "unload_model", "model_id": model}
    outcome = await api.outcome(queued)
    assert outcome["category"] == "user"
    assert "unloaded" in outcome["error"]
    status, answer = await api.post("forward", forward_body(model, 1))
    assert status == 404
    assert "model_id" in answer["detail"]


async def test_service_endpoints(trainer_api: tuple[Any, Api]) -> None:
    _trainer, api = trainer_api
    assert await api.get("healthz") == (200, {"status": "ok"})
    status, caps = await api.get("get_server_capabilities")
    assert status == 200
    assert caps["supported_models"][0]["model_name"] == BASE_MODEL
    status, config = await api.post("client/config", {"sdk_version": "0.23.0"})
    assert status == 200
    assert config["proto_write_fwdbwd"] is False
    assert config["proto_compress_fwdbwd"] is False
    status, dynamic = await api.post("client/dynamic_config", {"sdk_version": "0.38.0"})
    assert (status, dynamic) == (200, {"sample_cancel_enabled": True})
    telemetry = {"events": [], "platform": "Linux", "sdk_version": "1.2.30", "session_id": "x"}
    assert await api.post("telemetry", telemetry) == (200, {"status": "accepted"})


async def test_create_session_is_idempotent_per_key(trainer_api: tuple[Any, Api]) -> None:
    _trainer, api = trainer_api
    headers = {"X-Idempotency-Key": "stainless-python-retry-abc"}
    body = {"tags": [], "user_metadata": {}, "sdk_version": "0.23.0", "type": "create_session"}
    first = await api.post("create_session", body, headers=headers)
    again = await api.post("create_session", body, headers=headers)
    assert first == again
    other = await api.post("create_session", body)
    assert other[1]["session_id"] != first[1]["session_id"]


async def test_debug_execution_log_endpoint(
    make_trainer: TrainerFactory, make_model: ModelFactory
) -> None:
    async with make_model(debug_endpoints=True) as (_trainer, api, model):
        await api.result(await api.submit("forward", forward_body(model, 1)))
        status, answer = await api.get("debug/execution_log")
        assert status == 200
        entries = [(e["seq_id"], e["kind"]) for e in answer["entries"] if e["model_id"] == model]
        assert entries == [(0, "create_model"), (1, "forward")]
    async with make_trainer() as (_trainer, api):
        status, _answer = await api.get("debug/execution_log")
        assert status == 404


async def test_graceful_stop_answers_open_polls(make_model: ModelFactory) -> None:
    async with make_model(long_poll_seconds=600.0) as (trainer, api, model):
        pending = await api.submit("forward", forward_body(model, 2))  # never runnable
        poll = asyncio.ensure_future(api.poll(pending))
        await asyncio.sleep(0.05)
        assert not poll.done()
        await trainer.server.close()
        outcome = await poll
        assert outcome["category"] == "server"
        assert "shutting down" in outcome["error"]


async def test_execution_log_file(make_model: ModelFactory, tmp_path: Path) -> None:
    path = tmp_path / "log" / "executed.jsonl"
    async with make_model(execution_log_path=path) as (trainer, api, model):
        await api.result(await api.submit("forward", forward_body(model, 1)))
        in_memory = [attrs.asdict(r) for r in trainer.execution_log]
    lines = await asyncio.to_thread(path.read_text)
    assert [json.loads(line) for line in lines.splitlines()] == in_memory
    assert [(e["seq_id"], e["kind"]) for e in in_memory] == [(0, "create_model"), (1, "forward")]
