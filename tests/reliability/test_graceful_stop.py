"""Graceful stop: SIGTERM on ``firetitan serve`` while work is in flight.

The trainer is paused inside a checkpoint write (`hooked_serve.py`) with more requests
queued behind it, then gets SIGTERM. The write that was running finishes and is flushed
(it lists and loads after a restart), the queued requests fail at once with "the
trainer is shutting down" (the trainer answers polls until clients have collected
that), the process exits 0, and a call made after the trainer is gone fails with a
connection error within the client's retry deadline; nothing hangs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import pytest

from firetitan import (
    APIConnectionError,
    FutureState,
    RequestFailedError,
)

from .common import ADAM, IMPATIENT_CLIENT, served_model, sft_batch, sft_steps
from .conftest import Figures, Scale, scales

KEY = "tml-reliability-graceful-key"


async def until(predicate: Any, within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - client state has no event to wait on
            await asyncio.sleep(0.005)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "scale", scales(short={"rounds": 1, "queued": 3}, long={"rounds": 4, "queued": 40})
)
async def test_sigterm_flushes_the_running_write_and_fails_queued_work_clearly(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    root, pauses, job_id = tmp_path / "root", tmp_path / "pauses", "graceful-job"
    pauses.mkdir()
    args = ("--engine", "null", "--api-key", KEY, "--job-id", job_id)
    args += ("--checkpoint-dir", str(root))
    env = {"FIRETITAN_TEST_PAUSE_DIR": str(pauses)}
    outcomes: collections.Counter[str] = collections.Counter()
    stop_s: list[float] = []
    for round_ in range(scale.rounds):
        name = f"flush-{round_}"
        async with served_model(*args, hooked=True, env=env, key=KEY) as (child, tc):
            await sft_steps(tc, range(2))
            marker = pauses / f"write-state-{name}"
            marker.touch()
            save = tc.save_state(name)
            queued = []
            for i in range(scale.queued):
                queued.append(tc.forward_backward(sft_batch(10 + i), "cross_entropy"))
                queued.append(tc.optim_step(ADAM))
            await child.wait_for(rf"PAUSED write state {name}")
            # Everything queued is on the trainer (acknowledged) before the signal.
            await until(lambda q=queued: all(f.state is FutureState.SENT for f in q))

            child.terminate()
            await child.wait_for(r"stopping", stderr=True)
            signalled = time.monotonic()
            marker.unlink()  # the running write goes on and completes
            assert await child.wait(within=60) == 0, child.output
            stop_s.append(time.monotonic() - signalled)

            async with asyncio.timeout(60):
                results = await asyncio.gather(save, *queued, return_exceptions=True)
            saved, rest = results[0], results[1:]
            assert not isinstance(saved, BaseException), saved  # finished, not dropped
            for outcome in rest:
                # Queued work fails with a clear error: the trainer keeps answering polls
                # until the clients have collected that it is shutting down.
                assert isinstance(outcome, RequestFailedError), outcome
                assert outcome.category == "server"
                assert "the trainer is shutting down" in outcome.message
                outcomes[type(outcome).__name__] += 1

            # A call made after the trainer is gone: a clear error, within the deadline.
            with pytest.raises(APIConnectionError) as gone:
                async with asyncio.timeout(30):
                    await tc.forward(sft_batch(99), "cross_entropy")
            assert "failed" in str(gone.value) or "timed out" in str(gone.value)
            outcomes["later call: " + type(gone.value).__name__] += 1

        # The flushed checkpoint is complete: it lists and loads in a new process.
        async with served_model(*args, key=KEY) as (child, tc):
            assert name in await tc.list_checkpoints()
            await tc.load_state_with_optimizer(name)
            child.terminate()
            assert await child.wait() == 0
    figures.record(
        f"graceful stop (SIGTERM, {scale.name})",
        engine="null",
        stops=scale.rounds,
        running_writes_flushed=scale.rounds,
        queued_requests_failed_cleanly=sum(
            v for k, v in outcomes.items() if not k.startswith("later")
        ),
        outcomes=dict(outcomes),
        exit_code=0,
        slowest_stop_s=max(stop_s),
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("scale", scales(short={"pending": 40}, long={"pending": 200}))
async def test_a_dead_trainer_fails_every_pending_future_promptly(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    """SIGKILL with many futures pending: the client polls a few of a model's futures at
    a time, so if every poll waited out its own retry deadline, the last future would
    fail after (pending / polls) deadlines, hours with the default deadline. Once the
    trainer has been unreachable for a whole deadline, the rest fail at once."""
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    args = ("--engine", "null", "--api-key", KEY, "--checkpoint-dir", str(tmp_path / "root"))
    env = {"FIRETITAN_TEST_PAUSE_DIR": str(pauses)}
    async with served_model(*args, hooked=True, env=env, key=KEY) as (child, tc):
        (pauses / "write-state-hold").touch()  # everything below queues behind this save
        pending = [tc.save_state("hold")]
        pending += [tc.forward(sft_batch(i, size=1), "cross_entropy") for i in range(scale.pending)]
        await child.wait_for(r"PAUSED write state hold")
        await until(lambda: all(f.state is FutureState.SENT for f in pending))
        child.kill()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
        elapsed = loop.time() - killed
    assert all(isinstance(o, APIConnectionError) for o in outcomes), outcomes[:3]
    fast = sum("not retrying" in str(o) for o in outcomes)
    # Only the first few polls (those admitted before the outage lasted a deadline) wait
    # out their retries; the others fail at their first refused connection.
    polls = IMPATIENT_CLIENT.limits.max_polls_per_model
    assert fast >= len(outcomes) - 3 * polls, (fast, len(outcomes))
    figures.record(
        f"dead trainer (SIGKILL, {scale.name})",
        engine="null",
        pending_futures=len(outcomes),
        failed_with_connection_error=len(outcomes),
        failed_without_retrying=fast,
        all_failed_within_s=elapsed,
        retry_deadline_s=IMPATIENT_CLIENT.retry.deadline,
    )
