"""A model's queue cannot be hijacked: a seq_id far ahead of the next expected one is
refused, and requests naming another session are refused for this session's models."""

from __future__ import annotations

import pytest
import tinker
from aiohttp import web
from shared import connect

from firetitan import _wire
from firetitan.local.server import TrainerServer

from .conftest import ModelFactory, TrainerFactory
from .helpers import BASE_MODEL, executed, forward_body, optim_body

pytestmark = pytest.mark.asyncio


async def test_a_seq_id_far_ahead_is_refused_and_the_model_carries_on(
    make_model: ModelFactory,
) -> None:
    async with make_model(max_seq_id_lead=1000) as (trainer, api, model):
        status, answer = await api.post("optim_step", optim_body(model, 10**15))
        assert status == 422
        assert answer["detail"] == (
            f"seq_id: seq_id {10**15} is more than 1000 ahead of the next expected seq_id 1 "
            f"of model {model!r} (the limit max_seq_id_lead)"
        )
        assert (await api.post("optim_step", optim_body(model, 1002)))[0] == 422
        # The client's own next requests still run, in order.
        first = await api.submit("forward_backward", forward_body(model, 1, backward=True))
        step = await api.submit("optim_step", optim_body(model, 2))
        await api.result(first)
        await api.result(step)
        assert executed(trainer, model)[1:] == [(1, "forward_backward"), (2, "optim_step")]


async def test_requests_naming_another_session_are_refused(make_trainer: TrainerFactory) -> None:
    async with make_trainer() as (trainer, api):
        owner = await api.session()
        model = await api.model(owner)
        intruder = await api.session()
        foreign = {_wire.SESSION_HEADER: intruder}
        detail = f"model_id: model {model!r} belongs to another session than {intruder!r}"
        for endpoint, body in [
            ("optim_step", optim_body(model, 5)),
            ("forward", forward_body(model, 1)),
            ("get_info", {"model_id": model, "type": "get_info"}),
            ("unload_model", {"model_id": model, "type": "unload_model"}),
        ]:
            assert await api.post(endpoint, body, headers=foreign) == (
                403,
                {"detail": detail, "error_class": "PermissionDeniedError"},
            )
        own = {_wire.SESSION_HEADER: owner}
        request_id = await api.submit("forward", forward_body(model, 1), **own)
        await api.result(request_id)
        assert executed(trainer, model)[1:] == [(1, "forward")]


async def test_the_client_names_its_session_so_only_it_drives_its_models(
    make_trainer: TrainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []
    check = TrainerServer._check_owner

    def spy(self: TrainerServer, request: web.Request, model_id: str) -> None:
        if request.headers.get(_wire.SESSION_HEADER) != intruder[_wire.SESSION_HEADER]:
            seen.append(request.headers.get(_wire.SESSION_HEADER))
        check(self, request, model_id)

    monkeypatch.setattr(TrainerServer, "_check_owner", spy)
    intruder: dict[str, str] = {}
    async with (
        make_trainer() as (trainer, api),
        connect(trainer.base_url, trainer.api_key) as svc,
    ):
        tc = await svc.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        intruder[_wire.SESSION_HEADER] = await api.session()
        status, _ = await api.post("optim_step", optim_body(tc.model_id, 1), headers=intruder)
        assert status == 403
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4]},
        )
        await tc.forward_backward([datum], "cross_entropy")
        await tc.optim_step(tinker.AdamParams(learning_rate=1e-3))
        assert [kind for _, kind in executed(trainer, tc.model_id)] == [
            "create_model",
            "forward_backward",
            "optim_step",
        ]
        assert seen and set(seen) == {svc.session_id}
