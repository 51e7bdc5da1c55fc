"""Crash safety: SIGKILL the trainer process, restart it on the same checkpoint root, resume.

* Mid-run: ``firetitan serve`` (torch engine) is killed (SIGKILL) with requests in
  flight; the client's pending futures fail with a clear error instead of hanging; a
  new trainer process on the same root lists every checkpoint the client saw saved and
  only complete ones; a new client resumes from the latest with
  ``load_state_with_optimizer`` and ends bit-identical to a run that was never
  interrupted. The long form stops the trainer several times, by SIGKILL and SIGTERM
  alternately, at random points, including while a checkpoint is being written.
* Mid-write: a trainer paused at exact points inside a checkpoint write (see
  `hooked_serve.py`) is killed there; no partial checkpoint ever lists as valid, before
  or after the restart, and a checkpoint being replaced is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shared import FAST_TRAINER

from firetitan import (
    AsyncAPIFuture,
    AsyncFiretitanTrainingClient,
    FiretitanError,
    FutureState,
)
from firetitan.local import LocalTrainer

from .common import (
    ADAM,
    Child,
    digest,
    export_weights,
    local_model,
    served_model,
    sft_batch,
    sft_steps,
)
from .conftest import Figures, Scale, scales

KEY = "tml-reliability-crash-key"
TORCH_ARGS = ("--engine", "torch", "--size", "tiny", "--device", "cpu")


def serve_args(root: Path, job_id: str, *engine: str) -> tuple[str, ...]:
    return (*engine, "--api-key", KEY, "--job-id", job_id, "--checkpoint-dir", str(root))


async def reference_weights(tmp_path: Path, steps: int) -> bytes:
    """The weights after ``steps`` uninterrupted steps."""
    async with (
        LocalTrainer(
            "torch",
            size="tiny",
            device="cpu",
            checkpoint_dir=tmp_path / "reference",
            **FAST_TRAINER,
        ) as trainer,
        local_model(trainer) as tc,
    ):
        await sft_steps(tc, range(steps))
        assert trainer.checkpoint_dir is not None
        return await export_weights(tc, trainer.checkpoint_dir, trainer.job_id)


def submit_steps(
    tc: AsyncFiretitanTrainingClient, start: int, stop: int, every: int
) -> list[tuple[str, AsyncAPIFuture[Any]]]:
    """Steps ``start..stop-1``, all pipelined, with ``save_state("step-<n>")`` after every
    ``every``-th step."""
    futures: list[tuple[str, AsyncAPIFuture[Any]]] = []
    for step in range(start, stop):
        futures.append((f"fb-{step}", tc.forward_backward(sft_batch(step), "cross_entropy")))
        futures.append((f"opt-{step}", tc.optim_step(ADAM)))
        if (step + 1) % every == 0:
            futures.append((f"save-{step + 1}", tc.save_state(f"step-{step + 1}")))
    return futures


async def stop_when(child: Child, how: str, ready: Callable[[], bool], jitter: float) -> None:
    """Stop the child (``how``: ``"kill"`` or ``"term"``) once ``ready()`` holds, plus
    ``jitter`` seconds."""
    async with asyncio.timeout(60):
        while not ready():  # noqa: ASYNC110 - futures have no "acknowledged" event
            await asyncio.sleep(0.002)
    await asyncio.sleep(jitter)
    if how == "kill":
        child.kill()
    else:
        child.terminate()


async def resume_point(
    tc: AsyncFiretitanTrainingClient, every: int, steps: int, acknowledged: set[str]
) -> int:
    """Load the latest listed checkpoint (with its optimizer); return its step.

    Every save the client saw succeed is listed (an acknowledged checkpoint is durable),
    every listed name is one this run saved, and the one resumed from loads: a
    checkpoint that lists as valid is complete.
    """
    names = await tc.list_checkpoints()
    allowed = {f"step-{n}" for n in range(every, steps + 1, every)}
    assert acknowledged <= set(names) <= allowed, (acknowledged, names)
    if not names:
        return 0
    latest = max(names, key=lambda n: int(n.removeprefix("step-")))
    await tc.load_state_with_optimizer(latest)
    return int(latest.removeprefix("step-"))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "scale",
    scales(
        # One SIGKILL once step 10 is done (the last checkpoint is step-8): two steps
        # are redone after the restart.
        short={"steps": 14, "every": 4, "stops": [("kill", "optim", 9, 0.0)], "seed": 0},
        # SIGKILLs and SIGTERMs at random points; "save" stops come shortly after a
        # save_state was acknowledged, i.e. usually while the checkpoint is written.
        long={"steps": 32, "every": 4, "stops": "random", "count": 4, "seed": 7},
        long_timeout=900,
    ),
)
async def test_killed_mid_run_then_resumed_is_bit_identical(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    started = time.monotonic()
    # The uninterrupted run goes on in this process while the children run.
    reference = asyncio.ensure_future(reference_weights(tmp_path, scale.steps))
    try:
        weights, record = await interrupted_run(scale, tmp_path)
        expected = await reference
    finally:
        reference.cancel()
        await asyncio.gather(reference, return_exceptions=True)
    assert weights == expected, "resumed run differs from the uninterrupted run"
    figures.record(
        f"crash (stopped mid-run, resumed, {scale.name})",
        engine="torch",
        **record,
        weights_sha256=digest(weights),
        bit_identical=True,
        wall_s=time.monotonic() - started,
    )


async def interrupted_run(scale: Scale, tmp_path: Path) -> tuple[bytes, dict[str, Any]]:
    """Train to ``scale.steps``, killed and restarted as the scale says; the final
    weights and figures."""
    root, job_id = tmp_path / "crash-root", "crash-job"
    rng = random.Random(scale.seed)
    if scale.stops == "random":
        # Alternate SIGKILL/SIGTERM and the trigger; where and when come from the RNG.
        # ``after`` is an offset from the step the life resumes from.
        stops = [
            (
                ("kill", "term")[i % 2],
                ("optim", "save", "save", "optim")[i % 4],
                rng.randrange(1, 2 * scale.every),
                rng.uniform(0, 0.2),
            )
            for i in range(scale.count)
        ]
    else:
        stops = list(scale.stops)
    resumed_from: list[int] = []
    acknowledged: set[str] = set()
    failed_in_flight = succeeded = steps_done = 0
    for attempt in range(len(stops) + 1):
        async with served_model(*serve_args(root, job_id, *TORCH_ARGS), key=KEY) as (child, tc):
            start = await resume_point(tc, scale.every, scale.steps, acknowledged)
            resumed_from.append(start)
            if attempt == len(stops):  # the last life: run to the end, no stop
                await sft_steps(tc, range(start, scale.steps))
                weights = await export_weights(tc, root, job_id)
                break
            futures = submit_steps(tc, start, scale.steps, scale.every)
            how, kind, offset, jitter = stops[attempt]
            after = min(start + offset, scale.steps - 1)
            if kind == "save":
                saves = [f for name, f in futures if name.startswith("save-")] or [futures[-1][1]]
                target = saves[min(len(saves) - 1, (after - start) // scale.every)]

                def ready(target: AsyncAPIFuture[Any] = target) -> bool:
                    # Acknowledged (or already finished): the save is on the trainer.
                    return target.state not in (FutureState.QUEUED, FutureState.SENDING)
            else:
                target = dict(futures)[f"opt-{after}"]

                def ready(target: AsyncAPIFuture[Any] = target) -> bool:
                    return target.done()

            stopper = asyncio.ensure_future(stop_when(child, how, ready, jitter))
            # Every future resolves: a result, or a clear error once the trainer is
            # gone (the client's retry deadline is seconds); none hangs.
            async with asyncio.timeout(90):
                outcomes = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
            await stopper
            code = await child.wait()
            # SIGTERM is a graceful stop (exit 0); SIGKILL leaves no chance to clean up.
            assert (code == 0) == (how == "term"), (how, code, child.output[-2000:])
            for (name, _), outcome in zip(futures, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    assert isinstance(outcome, FiretitanError), (name, outcome)
                    assert str(outcome)
                    failed_in_flight += 1
                else:
                    succeeded += 1
                    if name.startswith("save-"):
                        acknowledged.add(f"step-{name.removeprefix('save-')}")
            done_steps = sum(
                1
                for (name, _), o in zip(futures, outcomes, strict=True)
                if name.startswith("opt-") and not isinstance(o, BaseException)
            )
            steps_done += done_steps
    return weights, {
        "kills": sum(1 for s in stops if s[0] == "kill"),
        "sigterms": sum(1 for s in stops if s[0] == "term"),
        "acknowledged_saves_found_after_restart": len(acknowledged),
        "resumed_from_steps": resumed_from,
        # Steps that finished before a kill but after the checkpoint resumed from.
        "steps_redone": steps_done - (resumed_from[-1] - resumed_from[0]),
        "in_flight_failed_cleanly": failed_in_flight,
        "completed_before_kill": succeeded,
    }


# --------------------------------------------------------------------------- mid-write


def _forward_probe(tc: AsyncFiretitanTrainingClient) -> Any:
    return tc.forward(sft_batch(1000, size=2), "cross_entropy")


async def _logprobs(tc: AsyncFiretitanTrainingClient) -> list[np.ndarray]:
    out = await _forward_probe(tc)
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


#: Where a checkpoint write is killed: (the checkpoint written, the pause file that
#: stops the trainer there, the line it prints when paused, steps trained beforehand).
CRASH_POINTS = {
    # After the engine wrote a new checkpoint, before it was committed.
    "before commit": ("partial", "write-state-partial", r"PAUSED write state partial", 0),
    # While replacing "good": the old folder moved aside, the new one not yet in place.
    "while replacing": ("good", "swap-state-good", r"PAUSED swap state good", 2),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("point", list(CRASH_POINTS))
@pytest.mark.parametrize("scale", scales(short={"rounds": 1}, long={"rounds": 5}))
async def test_kill_inside_a_checkpoint_write_never_lists_a_partial_checkpoint(
    scale: Scale, point: str, tmp_path: Path, figures: Figures
) -> None:
    name, pause, paused, more_steps = CRASH_POINTS[point]
    root, pauses, job_id = tmp_path / "root", tmp_path / "pauses", "write-job"
    pauses.mkdir()
    args = serve_args(root, job_id, "--engine", "null")
    env = {"FIRETITAN_TEST_PAUSE_DIR": str(pauses)}

    def trainer() -> contextlib.AbstractAsyncContextManager[
        tuple[Child, AsyncFiretitanTrainingClient]
    ]:
        return served_model(*args, key=KEY, hooked=True, env=env)

    for round_ in range(scale.rounds):
        # A committed checkpoint "good", and the model's outputs at that state.
        async with trainer() as (child, tc):
            await sft_steps(tc, range(round_ + 1))
            await tc.save_state("good", overwrite=True)  # rounds after the first replace it
            good = await _logprobs(tc)
            await sft_steps(tc, range(100, 100 + more_steps))
            (pauses / pause).touch()
            pending = tc.save_state(name, overwrite=True)
            await child.wait_for(paused)
            if name != "good":  # (a replaced "good" is moved aside meanwhile)
                assert await tc.list_checkpoints() == ["good"]  # not listed while written
            child.kill()
            with pytest.raises(FiretitanError):
                async with asyncio.timeout(60):
                    await pending
            (pauses / pause).unlink()

        # Restarted: the write never completed, "good" is listed alone and intact.
        async with trainer() as (child, tc):
            assert await tc.list_checkpoints() == ["good"]
            debris = root / job_id / ".tmp"
            assert not debris.exists() or not any(debris.iterdir()), "debris survived"
            await tc.load_state_with_optimizer("good")
            for a, b in zip(await _logprobs(tc), good, strict=True):
                np.testing.assert_array_equal(a, b)
    figures.record(
        f"crash (kill inside a checkpoint write, {point}, {scale.name})",
        engine="null",
        kills=scale.rounds,
        partial_checkpoints_listed=0,
        committed_checkpoints_lost=0,
    )
