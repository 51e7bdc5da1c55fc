"""Authentication, size limits and error answers: always JSON, always naming the field,
never a traceback; and the trainer keeps serving after every kind of bad request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import tinker

from firetitan.local.null_engine import NullEngine

from .conftest import ModelFactory
from .helpers import Api, executed, forward_body, optim_body, text_datum

pytestmark = pytest.mark.asyncio

ROUTES = [
    ("POST", "client/config"),
    ("POST", "client/dynamic_config"),
    ("POST", "create_session"),
    ("POST", "session_heartbeat"),
    ("POST", "sessions/sess-0/finish"),
    ("POST", "telemetry"),
    ("GET", "healthz"),
    ("GET", "get_server_capabilities"),
    ("POST", "create_model"),
    ("POST", "get_info"),
    ("POST", "forward"),
    ("POST", "forward_backward"),
    ("POST", "optim_step"),
    ("POST", "save_weights"),
    ("POST", "load_weights"),
    ("POST", "save_weights_for_sampler"),
    ("GET", "list_checkpoints"),
    ("POST", "unload_model"),
    ("POST", "retrieve_future"),
    ("POST", "create_sampling_session"),
    ("POST", "asample"),
    ("GET", "no_such_endpoint"),
]


@pytest.mark.parametrize(("method", "endpoint"), ROUTES)
@pytest.mark.parametrize("key", [None, "tml-wrong", ""])
async def test_every_endpoint_requires_the_key(
    trainer_api: tuple[Any, Api], method: str, endpoint: str, key: str | None
) -> None:
    _trainer, api = trainer_api
    headers = {} if key is None else {"X-API-Key": key}
    body: dict[str, Any] | None = None if method == "GET" else {}
    async with api.http.request(method, api.url(endpoint), json=body, headers=headers) as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        answer = await resp.json()
    assert "X-API-Key" in answer["detail"]
    assert answer["error_class"] == "AuthenticationError"


async def test_the_key_is_not_a_prefix_match(trainer_api: tuple[Any, Api]) -> None:
    trainer, api = trainer_api
    for key in (trainer.api_key[:-1], trainer.api_key + "x", trainer.api_key.upper()):
        headers = {"X-API-Key": key}
        async with api.http.get(api.url("healthz"), headers=headers) as resp:
            assert resp.status == 401
    assert await api.get("healthz") == (200, {"status": "ok"})


async def test_oversized_body_gets_413_json(make_model: ModelFactory) -> None:
    async with make_model(max_request_bytes=4096) as (_trainer, api, model):
        big = forward_body(model, 1, [text_datum(list(range(500)))])
        status, answer = await api.post("forward", big)
        assert status == 413
        assert "4096 bytes" in answer["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
            for _ in range(10):
                yield b" " * 1024

        status, answer = await api.post("telemetry", data=chunks())
        assert status == 413
        assert answer["error_class"] == "RequestTooLargeError"
        # Still serving, and the model's queue did not wait for the refused request.
        await api.result(await api.submit("forward", forward_body(model, 1)))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda b: b["forward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"].update(
                dtype="float16"
            ),
            "target_tokens.dtype",
        ),
        (
            lambda b: b["forward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"].update(
                shape=[4]
            ),
            "target_tokens",
        ),
        (
            lambda b: b["forward_input"]["data"][0]["model_input"]["chunks"][0].update(
                tokens=[1, "x", 3]
            ),
            "model_input",
        ),
        (lambda b: b["forward_input"].pop("loss_fn"), "loss_fn"),
        (lambda b: b.update(seq_id="1"), "seq_id"),
    ],
    ids=["dtype", "shape", "token", "missing-loss_fn", "seq_id-type"],
)
async def test_malformed_fields_get_400_naming_the_field(
    trainer_model: tuple[Any, Api, str], mutate: Any, expected: str
) -> None:
    _trainer, api, model = trainer_model
    body = forward_body(model, 1)
    mutate(body)
    status, answer = await api.post("forward", body)
    assert status == 400, answer
    assert expected in answer["detail"]
    assert "Traceback" not in answer["detail"]


async def test_malformed_json_and_non_objects(trainer_api: tuple[Any, Api]) -> None:
    _trainer, api = trainer_api
    for raw in (b"{not json", b"[1, 2]", b"", b'{"a": NaN}'):
        status, answer = await api.post("create_session", data=raw)
        assert status == 400, raw
        assert answer["detail"]
    status, answer = await api.post("retrieve_future", {"request_id": 7})
    assert status == 400
    assert "request_id" in answer["detail"]


async def test_unknown_ids_get_404(trainer_api: tuple[Any, Api]) -> None:
    _trainer, api = trainer_api
    status, answer = await api.post("forward", forward_body("sess-x:train:0", 1))
    assert status == 404
    assert "model_id" in answer["detail"]
    status, answer = await api.post("retrieve_future", {"request_id": "req-nope-1"})
    assert status == 404
    assert "request_id" in answer["detail"]
    status, answer = await api.post(
        "create_model", {"session_id": "sess-unknown", "model_seq_id": 0, "base_model": "b"}
    )
    assert status == 404
    assert "session_id" in answer["detail"]
    status, answer = await api.post("session_heartbeat", {"session_id": "sess-unknown"})
    assert status == 404


async def test_execution_time_user_errors_fail_the_future_only(
    trainer_model: tuple[Any, Api, str],
) -> None:
    trainer, api, model = trainer_model
    cases = [
        (
            forward_body(model, 1, [text_datum([1, 2, 3], targets=[1, 2])]),
            "datum 0: loss_fn_inputs['target_tokens']",
        ),
        (
            forward_body(model, 2, [text_datum([1, 2]), text_datum([1, 9999])]),
            "datum 1: model_input",
        ),
        (forward_body(model, 3, loss_fn="no_such_loss"), "no_such_loss"),
    ]
    for body, expected in cases:
        outcome = await api.outcome(await api.submit("forward", body))
        assert outcome["category"] == "user", outcome
        assert expected in outcome["error"]
        assert outcome["error_class"] == "UserError"
    # The trainer keeps serving, in order.
    ok = await api.result(await api.submit("forward", forward_body(model, 4)))
    assert ok["metrics"]["loss:sum"] > 0
    assert [s for s, _ in executed(trainer, model)] == [0, 1, 2, 3, 4]


class BrokenEngine(NullEngine):
    def optim_step(
        self, model_id: str, adam_params: tinker.AdamParams, norm: str | None
    ) -> dict[str, float]:
        raise RuntimeError("device fell off the bus")


async def test_engine_faults_are_server_errors_without_traceback(
    make_model: ModelFactory,
) -> None:
    async with make_model(engine=BrokenEngine()) as (_trainer, api, model):
        outcome = await api.outcome(await api.submit("optim_step", optim_body(model, 1)))
        assert outcome["category"] == "server"
        assert outcome["error_class"] == "RuntimeError"
        assert "optim_step failed" in outcome["error"]
        assert "device fell off the bus" in outcome["error"]
        assert "Traceback" not in outcome["error"]
        await api.result(await api.submit("forward", forward_body(model, 2)))


async def test_too_many_pending_requests_get_429(make_model: ModelFactory) -> None:
    async with make_model(max_pending_requests=2) as (_trainer, api, model):
        await api.submit("forward", forward_body(model, 3))  # waits for seq_id 1 and 2
        await api.submit("forward", forward_body(model, 4))
        async with api.http.post(
            api.url("forward"), json=forward_body(model, 5), headers={"X-API-Key": api.key}
        ) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error_class"] == "RateLimitError"


async def test_method_not_allowed_is_json(trainer_api: tuple[Any, Api]) -> None:
    _trainer, api = trainer_api
    async with api.http.get(api.url("forward"), headers={"X-API-Key": api.key}) as resp:
        assert resp.status == 405
        assert resp.content_type == "application/json"
        assert "forward" in (await resp.json())["detail"]


async def test_error_bodies_never_echo_the_key(trainer_api: tuple[Any, Api]) -> None:
    trainer, api = trainer_api
    headers = {"X-API-Key": trainer.api_key}
    async with api.http.post(api.url("create_session"), data=b"{", headers=headers) as resp:
        assert resp.status == 400
        assert trainer.api_key not in await resp.text()
    assert trainer.api_key not in repr(trainer)
