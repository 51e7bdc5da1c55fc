"""Hot-load and deployment sampling against a scriptable deployment: each pitfall of
deployment.md §8 the reference client has, shown handled, and the faults a deployment
may throw (overload with Retry-After, truncated streams, error stages, replicas that
disagree)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import tinker
from shared import BASE_MODEL

from firetitan import (
    APIResponseValidationError,
    AsyncDeployment,
    AsyncDeploymentSampler,
    BadRequestError,
    ClientConfig,
    DeploymentConfig,
    HotLoadError,
    HotLoadTimeoutError,
    InternalServerError,
    NotFoundError,
    RetryPolicy,
    Timeouts,
    _wire,
)
from firetitan.tokenizers import ByteTokenizer

from .fake_deployment import KEY, FakeDeployment, loading_state

pytestmark = pytest.mark.asyncio

FAST = ClientConfig(
    timeouts=Timeouts(connect=2.0, request=10.0),
    retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=20.0, max_retry_after=2.0),
)


def _config(fake: FakeDeployment, **changes: Any) -> DeploymentConfig:
    options: dict[str, Any] = {
        "deployment_id": "dep",
        "base_model": BASE_MODEL,
        "poll_interval": 0.05,
        **changes,
    }
    return DeploymentConfig(base_url=fake.base_url, **options)


@pytest_asyncio.fixture
async def deployment(fake: FakeDeployment) -> AsyncIterator[AsyncDeployment]:
    async with AsyncDeployment(_config(fake), api_key=KEY, client_config=FAST) as dep:
        yield dep


# ---------------------------------------------------------------------------- hot-load


async def test_account_is_resolved_once_and_a_key_with_two_accounts_is_refused(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    assert await deployment.model() == "accounts/acct/deployments/dep"
    fake.accounts.append({"name": "accounts/other"})
    assert await deployment.account() == "acct"  # resolved once
    async with AsyncDeployment(_config(fake), api_key=KEY, client_config=FAST) as fresh:
        with pytest.raises(APIResponseValidationError, match="2 accounts"):
            await fresh.account()


async def test_hot_load_waits_for_every_replica_not_only_the_first(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    # Replica 0 serves at once; replica 1 only after three more status polls.
    def plan(identity: str, replicas: list[dict[str, Any]]) -> None:
        replicas[0]["current_snapshot_identity"] = identity
        replicas[1]["readiness"] = False
        replicas[1]["loading_state"] = loading_state("loading", identity)
        fake.status_gets = 0

    fake.load_plan = plan
    task = asyncio.create_task(deployment.hot_load("snap-a"))
    while fake.status_gets < 3:  # noqa: ASYNC110 - the fake counts polls, nothing to wait on
        await asyncio.sleep(0.01)
    assert not task.done(), "success was declared while replica r1 was still loading"
    fake.replicas[1].update(current_snapshot_identity="snap-a", readiness=True)
    fake.replicas[1]["loading_state"] = loading_state("done", "snap-a")
    await asyncio.wait_for(task, 10)
    assert await deployment.serving() == "snap-a"


def _r1_fails(identity: str, replicas: list[dict[str, Any]]) -> None:
    """A load plan: replica 0 serves ``identity`` at once, replica 1 fails to load it."""
    replicas[0]["current_snapshot_identity"] = identity
    replicas[1]["loading_state"] = loading_state("error", identity, "no such snapshot")


def _r1_downloads_forever(identity: str, replicas: list[dict[str, Any]]) -> None:
    """A load plan: replica 1 is not ready, and stays downloading ``identity``."""
    replicas[1]["readiness"] = False
    replicas[1]["loading_state"] = loading_state("downloading", identity)


async def test_an_error_on_any_replica_fails_at_once_naming_it(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    fake.load_plan = _r1_fails
    started = time.monotonic()
    with pytest.raises(HotLoadError, match=r"r1.*no such snapshot") as info:
        await deployment.hot_load("never-saved")
    assert time.monotonic() - started < 5  # not a timeout
    assert info.value.identity == "never-saved"
    assert [r.replica_id for r in info.value.replicas] == ["r0", "r1"]
    assert not isinstance(info.value, HotLoadTimeoutError)


async def test_a_stale_error_for_another_identity_does_not_fail_the_load(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    fake.replicas[0]["loading_state"] = loading_state("error", "old")
    fake.replicas[1]["loading_state"] = None  # null, which the reference client trips on
    await deployment.hot_load("new")
    assert await deployment.serving() == "new"


async def test_a_timeout_says_what_each_replica_showed(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    fake.load_plan = _r1_downloads_forever
    with pytest.raises(HotLoadTimeoutError) as info:
        await deployment.hot_load("slow", time_limit=0.3)
    message = str(info.value)
    assert "r0: serving nothing" in message
    assert "r1: serving nothing (not ready), stage downloading for slow" in message


async def test_a_post_answered_503_is_resent_and_the_load_completes(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    fake.post_faults.extend(["503", "503"])
    await deployment.hot_load("snap")
    assert [p["identity"] for p in fake.hot_load_posts] == ["snap"] * 3
    assert await deployment.serving() == "snap"


async def test_an_empty_200_answer_to_the_post_is_an_error_not_a_success(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    fake.post_faults.append("empty")
    with pytest.raises(APIResponseValidationError, match="empty body"):
        await deployment.hot_load("snap")


async def test_reset_prompt_cache_refused_once_is_left_out_from_then_on(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    fake.reject_reset_prompt_cache = True
    await deployment.hot_load("one")
    await deployment.hot_load("two")
    sent = [("reset_prompt_cache" in p, p["identity"]) for p in fake.hot_load_posts]
    assert sent == [(True, "one"), (False, "one"), (False, "two")]


async def test_a_delta_whose_base_the_deployment_does_not_hold_is_never_sent(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    await deployment.hot_load("base-1")
    fake.replicas[1]["current_snapshot_identity"] = "something-else"
    with pytest.raises(HotLoadError, match=r"applies to 'base-1'.*r1: serving something-else"):
        await deployment.hot_load("delta-2", previous="base-1")
    assert [p["identity"] for p in fake.hot_load_posts] == ["base-1"]
    fake.replicas[1]["current_snapshot_identity"] = "base-1"
    await deployment.hot_load("delta-2", previous="base-1")
    assert fake.hot_load_posts[-1]["incremental_snapshot_metadata"] == {
        "previous_snapshot_identity": "base-1",
        "compression_format": "arc_v2",
        "checksum_format": "alder32",
    }


async def test_a_snapshot_already_served_is_not_hot_loaded_again(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    assert await deployment.hot_load("snap", unless_serving=True) is True
    assert await deployment.hot_load("snap", unless_serving=True) is False
    assert await deployment.hot_load("snap") is True
    assert len(fake.hot_load_posts) == 2


async def test_a_refused_base_model_is_a_bad_request_with_the_servers_words(
    fake: FakeDeployment,
) -> None:
    config = _config(fake, base_model="accounts/fireworks/models/other")
    async with AsyncDeployment(config, api_key=KEY, client_config=FAST) as dep:
        with pytest.raises(BadRequestError, match="base model mismatch"):
            await dep.hot_load("snap")


# ---------------------------------------------------------------------------- sampling


async def test_n_samples_get_distinct_seeds_and_sampling_logprobs(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    sampler = AsyncDeploymentSampler(deployment)
    completions = await sampler.sample_tokens([1, 2, 3], num_samples=3, max_tokens=2, seed=10)
    assert [c.tokens for c in completions] == [[10, 11], [11, 12], [12, 13]]
    assert all(c.logprobs == [-2.0, -2.0] for c in completions)  # sampling_logprob
    bodies = [c["body"] for c in fake.completions]
    assert sorted(b["seed"] for b in bodies) == [10, 11, 12]
    assert all(b["n"] == 1 and b["stream"] and b["raw_output"] for b in bodies)
    assert len({c["request_id"] for c in fake.completions}) == 3


async def test_a_stop_string_is_one_stop_and_stop_ids_go_through_the_tokenizer(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    sampler = AsyncDeploymentSampler(deployment, tokenizer=ByteTokenizer())
    await sampler.sample_tokens([1], max_tokens=1, stop="<9>")
    await sampler.sample_tokens([1], max_tokens=1, stop=[ord("\n"), ByteTokenizer.eos_token_id])
    await sampler.sample_tokens([1], max_tokens=1, stop=["a", "bc"])
    stops = [c["body"].get("stop") for c in fake.completions]
    assert stops == [["<9>"], ["\n"], ["a", "bc"]]
    with pytest.raises(ValueError, match="need a tokenizer"):
        await AsyncDeploymentSampler(deployment).sample_tokens([1], stop=[5])


async def test_overload_halves_the_limit_and_waits_out_retry_after(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    sampler = AsyncDeploymentSampler(deployment)
    before = deployment.concurrency_limit
    fake.completion_faults.extend(["429:0.4", "503:0.4"])
    started = time.monotonic()
    completions = await sampler.sample_tokens([1], num_samples=2, max_tokens=1, seed=0)
    assert time.monotonic() - started >= 0.4
    assert len(completions) == 2
    assert deployment.concurrency_limit == before // 2  # once per episode, not per 429
    retried = [c for c in fake.completions[2:]]
    assert {c["request_id"] for c in retried} == {c["request_id"] for c in fake.completions[:2]}


async def test_503_then_a_truncated_stream_then_success_under_one_request_id(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    sampler = AsyncDeploymentSampler(deployment)
    fake.completion_faults.extend(["503", "truncate", "event-error:503"])
    [completion] = await sampler.sample_tokens([4, 5], max_tokens=3, seed=1)
    assert completion.tokens == [1, 2, 3] and completion.finish_reason == "length"
    assert len(fake.completions) == 4
    assert len({c["request_id"] for c in fake.completions}) == 1


@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [
        ("event-error:400", BadRequestError, "upstream"),
        ("finish-error", Exception, "finished with 'error'"),
        ("no-raw-output", APIResponseValidationError, "completion_token_ids"),
    ],
)
async def test_permanent_stream_failures_fail_at_once(
    fake: FakeDeployment, deployment: AsyncDeployment, fault: str, error: type, match: str
) -> None:
    fake.completion_faults.append(fault)
    with pytest.raises(error, match=match):
        await AsyncDeploymentSampler(deployment).sample_tokens([1], max_tokens=1)
    assert len(fake.completions) == 1


async def test_retries_that_outlast_the_policy_end_in_the_last_error(fake: FakeDeployment) -> None:
    config = FAST.evolve(retry=RetryPolicy(max_attempts=3, initial_backoff=0.01))
    async with AsyncDeployment(_config(fake), api_key=KEY, client_config=config) as dep:
        fake.completion_faults.extend(["503"] * 5)
        with pytest.raises(InternalServerError, match="HTTP 503"):
            await AsyncDeploymentSampler(dep).sample_tokens([1], max_tokens=1)
    assert len(fake.completions) == 3


async def test_prompt_logprobs_keep_every_row_despite_a_null_first_one(
    fake: FakeDeployment, deployment: AsyncDeployment
) -> None:
    sampler = AsyncDeploymentSampler(deployment)
    request = _wire.SampleRequest(
        prompt=tinker.ModelInput.from_ints([5, 6, 7]),
        num_samples=1,
        sampling_params=tinker.SamplingParams(max_tokens=2, temperature=0.7),
        prompt_logprobs=True,
        topk_prompt_logprobs=1,
    )
    response = await sampler._sample(request)  # as a sampling client on it asks
    assert response.prompt_logprobs == [None, -0.5, -0.5]
    assert response.topk_prompt_logprobs == [None, [(7, -0.25)], [(7, -0.25)]]
    assert list(response.sequences[0].tokens) == [0, 1]
    assert list(response.sequences[0].logprobs) == [-2.0, -2.0]
    assert fake.completions[0]["body"]["echo"] is True


async def test_hundreds_of_concurrent_samples_share_pooled_connections(
    fake: FakeDeployment,
) -> None:
    fake.delay = 0.05
    config = _config(fake, max_concurrency=64)
    async with AsyncDeployment(config, api_key=KEY, client_config=FAST) as dep:
        sampler = AsyncDeploymentSampler(dep)
        results = await asyncio.gather(
            *(sampler.sample_tokens([i], max_tokens=1, seed=i) for i in range(300))
        )
    assert [r[0].tokens for r in results] == [[i % 97] for i in range(300)]
    assert fake.max_in_flight <= 64
    connections = {c["peer"] for c in fake.completions}
    assert len(connections) <= 64  # reused keep-alive connections, not one per request


async def test_a_wrong_deployment_fails_at_once_not_after_50_seconds_of_retries(
    fake: FakeDeployment,
) -> None:
    config = _config(fake, account="acct", deployment_id="no-such-deployment")
    async with AsyncDeployment(config, api_key=KEY, client_config=FAST) as dep:
        with pytest.raises(NotFoundError, match="model not found"):
            await AsyncDeploymentSampler(dep).sample_tokens([1], max_tokens=1)
    assert len(fake.completions) == 1
