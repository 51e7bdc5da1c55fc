"""Per-model seq_id order, exactly-once execution, and gaps (wire.md §5.4-§5.5)."""

from __future__ import annotations

import pytest

from .conftest import ModelFactory, TrainerFactory
from .helpers import BASE_MODEL, executed, forward_body, optim_body, text_datum

pytestmark = pytest.mark.asyncio


async def test_chunks_arriving_out_of_order_run_in_seq_order(make_model: ModelFactory) -> None:
    async with make_model() as (trainer, api, model):
        # Three chunks of one forward_backward, uploaded in reverse, then the optim_step.
        ids = {}
        for seq in (3, 2, 1):
            body = forward_body(model, seq, [text_datum([seq, 5, 6])], backward=True)
            ids[seq] = await api.submit("forward_backward", body)
        ids[4] = await api.submit("optim_step", optim_body(model, 4))
        for seq in (1, 2, 3):
            result = await api.result(ids[seq])
            assert len(result["loss_fn_outputs"]) == 1
        step = await api.result(ids[4])
        assert step["metrics"]["loss_tokens:sum"] == 9.0  # all three chunks were accumulated
        assert executed(trainer, model) == [
            (0, "create_model"),
            (1, "forward_backward"),
            (2, "forward_backward"),
            (3, "forward_backward"),
            (4, "optim_step"),
        ]


async def test_duplicate_post_runs_once_and_returns_the_same_request_id(
    make_model: ModelFactory,
) -> None:
    async with make_model() as (trainer, api, model):
        first = await api.submit("forward_backward", forward_body(model, 1, backward=True))
        retry = await api.submit("forward_backward", forward_body(model, 1, backward=True))
        # A "duplicate" with another body is still the same (model_id, seq_id).
        other = forward_body(model, 1, [text_datum([9, 9])], backward=True)
        different = await api.submit("forward_backward", other)
        assert first == retry == different
        await api.result(first)
        # Late retries after completion still get the same id and do not run again.
        assert await api.submit("forward_backward", forward_body(model, 1, backward=True)) == first
        step = await api.result(await api.submit("optim_step", optim_body(model, 2)))
        assert step["metrics"]["loss_tokens:sum"] == 3.0  # accumulated once, not three times
        assert executed(trainer, model) == [
            (0, "create_model"),
            (1, "forward_backward"),
            (2, "optim_step"),
        ]


async def test_duplicate_unordered_posts_run_once(make_trainer: TrainerFactory) -> None:
    async with make_trainer() as (trainer, api):
        session = await api.session()
        body = {
            "session_id": session,
            "model_seq_id": 0,
            "base_model": BASE_MODEL,
            "lora_config": {"rank": 0},
            "type": "create_model",
        }
        created = await api.submit("create_model", body)
        assert await api.submit("create_model", {**body, "base_model": "other"}) == created
        model = (await api.result(created))["model_id"]
        headers = {"X-Idempotency-Key": "stainless-python-retry-1"}
        unload = await api.submit("unload_model", {"model_id": model}, **headers)
        assert await api.submit("unload_model", {"model_id": model}, **headers) == unload
        assert (await api.result(unload)) == {"type": "unload_model", "model_id": model}
        kinds = [r.kind for r in trainer.execution_log]
        assert kinds.count("create_model") == 1
        assert kinds.count("unload_model") == 1


async def test_gap_is_skipped_when_a_later_non_chunk_request_arrives(
    make_model: ModelFactory,
) -> None:
    async with make_model(gap_wait_seconds=60.0) as (trainer, api, model):
        # seq_id 1 never comes (say its submission failed for good on the client).
        fb = await api.submit("forward_backward", forward_body(model, 2, backward=True))
        opt = await api.submit("optim_step", optim_body(model, 3))
        await api.result(fb)
        await api.result(opt)
        assert executed(trainer, model) == [
            (0, "create_model"),
            (2, "forward_backward"),
            (3, "optim_step"),
        ]
        # If seq_id 1 turns up after all, it must not run out of order: it fails instead.
        late = await api.submit("forward", forward_body(model, 1))
        outcome = await api.outcome(late)
        assert outcome["category"] == "user"
        assert "seq_id 1" in outcome["error"]
        assert (1, "forward") not in executed(trainer, model)


async def test_gap_before_chunks_is_skipped_after_the_bounded_wait(
    make_model: ModelFactory,
) -> None:
    async with make_model(gap_wait_seconds=0.3) as (trainer, api, model):
        # Only chunk 2 of a call arrives: chunks prove nothing about lower seq_ids, so the
        # queue waits, but only for gap_wait_seconds.
        fb = await api.submit("forward_backward", forward_body(model, 2, backward=True))
        await api.result(fb)
        assert executed(trainer, model) == [(0, "create_model"), (2, "forward_backward")]


async def test_a_rejected_post_leaves_no_gap_to_wait_for(make_model: ModelFactory) -> None:
    async with make_model(gap_wait_seconds=60.0, long_poll_seconds=20.0) as (trainer, api, model):
        bad = {"model_id": model, "seq_id": 1, "path": "../escape", "type": "save_weights"}
        status, answer = await api.post("save_weights", bad)
        assert status == 422
        assert "path" in answer["detail"]
        fb = await api.submit("forward_backward", forward_body(model, 2, backward=True))
        # The first poll returns the result: nothing waited for the refused seq_id 1.
        result = await api.poll(fb)
        assert result.get("type") != "try_again"
        assert executed(trainer, model) == [(0, "create_model"), (2, "forward_backward")]


async def test_models_are_independent(make_trainer: TrainerFactory) -> None:
    async with make_trainer() as (trainer, api):
        session = await api.session()
        a = await api.model(session, 0)
        b = await api.model(session, 1)
        # Model a waits for its seq_id 1; model b is not held up by it.
        pending = await api.submit("forward", forward_body(a, 2))
        done = await api.submit("forward", forward_body(b, 1))
        await api.result(done)
        await api.submit("forward", forward_body(a, 1))
        await api.result(pending)
        assert executed(trainer, a) == [(0, "create_model"), (1, "forward"), (2, "forward")]
        assert executed(trainer, b) == [(0, "create_model"), (1, "forward")]
