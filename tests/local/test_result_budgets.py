"""What one client can make the trainer hold: retained results are bounded in bytes,
and one sampling request in samples and tokens."""

from __future__ import annotations

import pytest

from .conftest import ModelFactory, TrainerFactory
from .helpers import BASE_MODEL, forward_body, text_datum

pytestmark = pytest.mark.asyncio


async def test_retained_results_are_bounded_in_bytes(make_model: ModelFactory) -> None:
    async with make_model(max_retained_result_bytes=10_000) as (_trainer, api, model):
        data = [text_datum(list(range(1, 50)))] * 2  # about 4 kB retained per result
        ids = []
        for seq in range(1, 11):
            ids.append(await api.submit("forward", forward_body(model, seq, data)))
        await api.result(ids[-1])
        status, answer = await api.post("retrieve_future", {"request_id": ids[0]})
        assert status == 410  # the oldest went first, although nobody had polled it
        assert answer["detail"] == (
            f"request_id: the result of request {ids[0]!r} is no longer kept; results are "
            "kept for 900 s, at most 10000 of them and at most 10000 bytes in all "
            "(the oldest go first)"
        )
        await api.result(ids[-2])  # the newest are kept


async def test_the_newest_result_is_kept_however_large(make_model: ModelFactory) -> None:
    async with make_model(max_retained_result_bytes=1) as (_trainer, api, model):
        request_id = await api.submit("forward", forward_body(model, 1))
        assert "loss_fn_outputs" in await api.result(request_id)


@pytest.mark.parametrize(
    ("num_samples", "max_tokens", "detail"),
    [
        (
            65_536,
            1,
            "num_samples is 65536; one request may ask for at most 128 "
            "(max_samples_per_request): send several requests",
        ),
        (
            100,
            1000,
            "num_samples * max_tokens is 100 * 1000 = 100000 tokens; one request may "
            "generate at most 65536 (max_sampled_tokens_per_request): send several requests",
        ),
        (
            512 // 2,  # over both: the count is reported first
            None,
            "num_samples is 256; one request may ask for at most 128 "
            "(max_samples_per_request): send several requests",
        ),
    ],
)
async def test_one_sampling_request_is_bounded_in_samples_and_tokens(
    make_trainer: TrainerFactory, num_samples: int, max_tokens: int | None, detail: str
) -> None:
    async with make_trainer() as (trainer, api):
        params = {} if max_tokens is None else {"max_tokens": max_tokens}
        body = {
            "base_model": BASE_MODEL,
            "num_samples": num_samples,
            "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
            "sampling_params": params,
        }
        assert await api.post("asample", body) == (
            422,
            {"detail": detail, "error_class": "UnprocessableEntityError"},
        )
        assert not [r for r in trainer.execution_log if r.kind == "asample"]
        within = {**body, "num_samples": 128, "sampling_params": {"max_tokens": 512}}
        assert "sequences" in await api.result(await api.submit("asample", within))
