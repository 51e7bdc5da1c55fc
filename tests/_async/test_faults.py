"""Under injected faults (dropped connections before and after the trainer saw a
request, 503, 429 with Retry-After, slow and truncated answers) every call completes,
and the trainer executes each request exactly once: no duplicate, no loss."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import tinker
from faults import FAULT_KINDS, FaultPlan
from shared import proxied

from firetitan import AsyncFiretitanServiceClient, ClientConfig, Limits, RetryPolicy, Timeouts
from firetitan.local import LocalTrainer

from .helpers import ADAM, BASE_MODEL, FAST_TRAINER, batch, executed, summary

# Submissions time out after 0.8 s, so a 1.2 s "delay" fault on a submission is a
# timeout after the trainer received the request; long-polls (held 1 s by the trainer)
# allow 5 s, so delayed polls just arrive late.
FAULTY_CLIENT = ClientConfig(
    timeouts=Timeouts(connect=2.0, request=0.8, long_poll_read=5.0),
    retry=RetryPolicy(
        max_attempts=12, initial_backoff=0.01, max_backoff=0.1, deadline=60.0, max_retry_after=0.1
    ),
    limits=Limits(max_chunk_datums=2),
    future_deadline=120.0,
    heartbeat_interval=0.5,
)
PROMPT = tinker.ModelInput.from_ints([3, 4, 5])


async def scripted_run(service: AsyncFiretitanServiceClient) -> tuple[str, list[Any]]:
    """A short training run touching every ordered call kind, plus sampling."""
    tc = await service.create_training_client(BASE_MODEL)
    futures: list[Any] = []
    for i in range(6):
        futures.append(tc.forward_backward(batch(3, seed=i), "cross_entropy"))  # 2 chunks
        futures.append(tc.optim_step(ADAM))
    futures.append(tc.forward(batch(2, seed=99), "cross_entropy"))
    futures.append(tc.save_state("ckpt"))
    futures.append(tc.load_state_with_optimizer("ckpt"))
    futures.append(tc.save_weights_for_sampler("export"))
    results = [await f for f in futures]
    sampler = await service.create_sampling_client(base_model=BASE_MODEL)
    samples = [sampler.sample(PROMPT, 1, tinker.SamplingParams(max_tokens=2, seed=i))
               for i in range(10)]
    for sample in samples:
        results.append(len((await sample).sequences))
    return tc.model_id, results


def digest(results: list[Any]) -> list[Any]:
    return [
        summary(r) if isinstance(r, tinker.ForwardBackwardOutput | tinker.OptimStepResponse)
        else r if isinstance(r, int) else type(r).__name__
        for r in results
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", [1, 2])
async def test_every_call_completes_and_executes_exactly_once(seed: int) -> None:
    runs = []
    for rate in (0.0, 0.3):
        async with (
            LocalTrainer("null", seed=3, **FAST_TRAINER) as trainer,
            proxied(trainer, FaultPlan(rate=rate, seed=seed, delay=1.2), FAULTY_CLIENT) as (
                proxy,
                service,
            ),
        ):
            model_id, results = await scripted_run(service)
            proxy.set_rate(0.0)
            log = executed(trainer, model_id)
            kinds = collections.Counter(r.kind for r in trainer.execution_log)
            runs.append((digest(results), log, kinds, dict(proxy.injected)))

    (clean, clean_log, clean_kinds, _), (faulty, faulty_log, faulty_kinds, injected) = runs
    assert sum(injected.values()) >= 10 and len(injected) == len(FAULT_KINDS), injected
    # Exactly once, in order: seq_ids 1..N with no duplicate and no gap.
    assert [s for s, _ in faulty_log] == list(range(1, len(faulty_log) + 1))
    assert faulty_log == clean_log
    assert faulty_kinds == clean_kinds  # creates and samples too: no duplicate
    assert faulty_kinds["asample"] == 10 and faulty_kinds["create_model"] == 1
    # ...and the same results as the run without faults.
    assert faulty == clean
