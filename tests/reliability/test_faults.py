"""Exactly once under faults.

An SFT run on the torch engine goes through the loopback fault proxy (`tests/faults.py`):
connections cut before and after the trainer received a request, 503s, 429s with
``Retry-After``, answers held past the client's timeout and truncated answers. The run
must end with weights bit-identical to the same run without faults, the trainer's
execution log must show every ordered request executed exactly once and in order, and
the run must finish within a bound (a hang fails the test instead of stalling CI).
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import pytest
from faults import FAULT_KINDS, FaultPlan
from shared import BASE_MODEL, FAST_TRAINER, proxied

from firetitan import ClientConfig, RetryPolicy, Timeouts
from firetitan.local import LocalTrainer

from .common import digest, export_weights, ordered_log, sft_steps
from .conftest import Figures, Scale, scales
from .hostile import ORDERED

# Submissions time out after 0.8 s, so a "delay" fault (1.2 s) on a submission is a
# timeout *after* the trainer received the request: the retry must be deduplicated.
# Long-polls (held 1 s by the trainer) may take 5 s, so a delayed poll just arrives late.
FAULTY_CLIENT = ClientConfig(
    timeouts=Timeouts(connect=2.0, request=0.8, long_poll_read=5.0),
    retry=RetryPolicy(
        max_attempts=15, initial_backoff=0.01, max_backoff=0.2, deadline=60.0, max_retry_after=0.2
    ),
    future_deadline=120.0,
    heartbeat_interval=0.5,
)
PROXY_DELAY_S = 1.2
ORDERED_PATHS = frozenset(f"/api/v1/{kind}" for kind in ORDERED)
# Faults after which the trainer has seen the request although the client got no answer.
SEEN_BY_TRAINER = frozenset({"cut_after", "delay", "truncate"})


async def sft_run(
    trainer: LocalTrainer, steps: int, plan: FaultPlan, scripted: bool
) -> dict[str, Any]:
    """``steps`` SFT steps and a mid-run save_state through a proxy; the run's results."""
    async with proxied(trainer, plan, FAULTY_CLIENT) as (proxy, service):
        if scripted:
            # Every kind at least once where it hurts most, whatever the random draw.
            for kind in FAULT_KINDS:
                proxy.inject(kind, "/api/v1/forward_backward")
                proxy.inject(kind, "/api/v1/optim_step")
                proxy.inject(kind, "/api/v1/retrieve_future")
        started = time.monotonic()
        tc = await service.create_training_client(BASE_MODEL)
        half = steps // 2
        metrics = await sft_steps(tc, range(half))
        await tc.save_state("half")
        metrics += await sft_steps(tc, range(half, steps))
        assert trainer.checkpoint_dir is not None
        weights = await export_weights(tc, trainer.checkpoint_dir, trainer.job_id)
        elapsed = time.monotonic() - started
        proxy.set_rate(0.0)
        redelivered = sum(
            1 for r in proxy.records if r.path in ORDERED_PATHS and r.fault in SEEN_BY_TRAINER
        )
        return {
            "model_id": tc.model_id,
            "metrics": metrics,
            "weights": weights,
            "elapsed": elapsed,
            "injected": collections.Counter(proxy.injected),
            "requests": len(proxy.records),
            "redelivered": redelivered,
        }


async def run_on_fresh_trainer(
    tmp_path: Path, name: str, steps: int, plan: FaultPlan, scripted: bool, bound: float
) -> dict[str, Any]:
    async with LocalTrainer(
        "torch", size="tiny", device="cpu", checkpoint_dir=tmp_path / name, **FAST_TRAINER
    ) as trainer:
        # A hang anywhere (a lost poll, a stalled queue) fails here, not at the CI timeout.
        async with asyncio.timeout(bound):
            result = await sft_run(trainer, steps, plan, scripted)
        log = trainer.execution_log
    result["ordered"] = ordered_log(log, result["model_id"])
    result["request_ids"] = [r.request_id for r in log]
    result["creates"] = sum(1 for r in log if r.kind == "create_model")
    return result


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "scale",
    scales(
        short={"steps": 50, "runs": [(0.1, 11)], "bound": 100.0},
        long={
            "steps": 50,
            "runs": [(0.1, 11), (0.1, 12), (0.1, 13), (0.1, 14), (0.25, 15)],
            "bound": 150.0,
        },
    ),
)
async def test_sft_through_faults_is_bit_identical_and_exactly_once(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    plans = [
        FaultPlan(rate=rate, seed=seed, delay=PROXY_DELAY_S, retry_after=0.05)
        for rate, seed in scale.runs
    ]
    # The clean run and the first faulty run go side by side (two engine threads).
    clean, *faulty_runs = await asyncio.gather(
        run_on_fresh_trainer(
            tmp_path, "clean", scale.steps, FaultPlan(rate=0.0), scripted=False, bound=scale.bound
        ),
        run_on_fresh_trainer(
            tmp_path, "faulty-0", scale.steps, plans[0], scripted=True, bound=scale.bound
        ),
    )
    for i, plan in enumerate(plans[1:], start=1):
        faulty_runs.append(
            await run_on_fresh_trainer(
                tmp_path, f"faulty-{i}", scale.steps, plan, scripted=True, bound=scale.bound
            )
        )
    # Ordered requests: one forward_backward and one optim_step per step, the save_state,
    # the export; seq_ids 1..N, each once.
    expected_count = 2 * scale.steps + 2
    assert [s for s, _ in clean["ordered"]] == list(range(1, expected_count + 1))

    totals: collections.Counter[str] = collections.Counter()
    checked = redelivered = requests = 0
    slowest = 0.0
    for faulty in faulty_runs:
        # Bit-identical weights, and the same result for every call.
        assert digest(faulty["weights"]) == digest(clean["weights"])
        assert faulty["weights"] == clean["weights"]
        assert faulty["metrics"] == clean["metrics"]
        # Exactly once: the same ordered requests, each seq_id once, in order...
        assert faulty["ordered"] == clean["ordered"]
        # ...no request id ran twice, and the model was created once.
        assert len(set(faulty["request_ids"])) == len(faulty["request_ids"])
        assert faulty["creates"] == 1
        injected: collections.Counter[str] = faulty["injected"]
        assert set(injected) == set(FAULT_KINDS), injected
        # Retries really reached the trainer twice and were deduplicated there.
        assert faulty["redelivered"] > 0
        totals.update(injected)
        checked += len(faulty["ordered"])
        redelivered += faulty["redelivered"]
        requests += faulty["requests"]
        slowest = max(slowest, faulty["elapsed"])

    figures.record(
        f"faults ({scale.name})",
        engine="torch",
        runs=len(scale.runs),
        steps_per_run=scale.steps,
        rates=sorted({rate for rate, _ in scale.runs}),
        requests_through_proxy=requests,
        faults_injected=sum(totals.values()),
        faults_by_kind=dict(totals),
        redelivered_to_trainer=redelivered,
        ordered_requests_checked_exactly_once=checked,
        weights_sha256=digest(clean["weights"]),
        clean_run_s=clean["elapsed"],
        slowest_faulty_run_s=slowest,
    )
