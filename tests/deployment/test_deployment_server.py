"""The local deployment in-process: hot-load states, the snapshot chain, completions
bodies, batching equal to unbatched generation, weights during a hot-load, refusals."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path
from unittest.mock import ANY

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from shared import BASE_MODEL

from firetitan.local.deployment.server import COMPLETIONS_PATH, HOT_LOAD_PATH

from .helpers import KEY, Deployment, Snapshots, generated, token_logprobs

pytestmark = pytest.mark.asyncio

PROMPT = [104, 101, 108, 108, 111]  # "hello"
GREEDY = {"temperature": 0, "max_tokens": 8, "logprobs": True, "raw_output": True, "stop": []}


async def _matches_trainer(dep: Deployment, snapshots: Snapshots) -> None:
    """Greedy tokens' logprobs from the deployment equal the trainer's forward ones."""
    answer = await dep.complete(PROMPT, **GREEDY)
    tokens = generated(answer)
    assert len(tokens) == 8
    expected = snapshots.logprobs(PROMPT + tokens)[len(PROMPT) - 1 :]
    assert token_logprobs(answer) == pytest.approx(expected, abs=1e-4)


async def test_control_plane(deployment: Deployment) -> None:
    status, body = await deployment.request(
        "GET", "/v1/accounts?pageSize=2", headers={"X-Api-Key": KEY}
    )
    assert status == 200 and body["accounts"] == [{"name": "accounts/acct"}]
    status, body = await deployment.request(
        "GET", "/v1/accounts/acct/deployments/dep", headers={"X-Api-Key": KEY}
    )
    assert status == 200
    assert body["name"] == "accounts/acct/deployments/dep" and body["baseModel"] == BASE_MODEL
    assert body["state"] == "READY"
    status, body = await deployment.request(
        "GET", "/v1/accounts/acct/deployments/other", headers={"X-Api-Key": KEY}
    )
    assert status == 404 and "not found" in body["error"]["message"]


async def test_base_then_two_deltas_serve_the_trainers_weights(
    deployment: Deployment, snapshots: Snapshots
) -> None:
    snapshots.save("s0")
    replica = await deployment.hot_load("s0")
    assert replica["readiness"] and replica["current_snapshot_identity"] == "s0"
    await _matches_trainer(deployment, snapshots)
    previous = "s0"
    for name in ("s1", "s2"):
        snapshots.train(f"step {name}")
        snapshots.save(name, "delta")
        replica = await deployment.hot_load(name, previous=previous)
        assert replica["loading_state"]["stage"] == "done", replica
        assert replica["current_snapshot_identity"] == name
        await _matches_trainer(deployment, snapshots)
        previous = name
    # a re-sent POST for the served identity is idempotent
    status, body = await deployment.request(
        "POST", HOT_LOAD_PATH, {"identity": "s2", "incremental_snapshot_metadata": {
            "previous_snapshot_identity": "s1"}}
    )  # fmt: skip
    assert status == 200 and body["stage"] == "done"


async def test_a_delta_rebuilds_from_disk_when_its_base_is_not_served(
    deployment: Deployment, snapshots: Snapshots
) -> None:
    snapshots.save("s0")
    snapshots.train()
    snapshots.save("s1", "delta")
    replica = await deployment.hot_load("s1", previous="s0")  # s0 was never hot-loaded
    assert replica["current_snapshot_identity"] == "s1", replica
    await _matches_trainer(deployment, snapshots)


async def test_refused_hot_loads_end_in_stage_error(
    deployment: Deployment, snapshots: Snapshots
) -> None:
    snapshots.save("s0")
    snapshots.train()
    snapshots.save("s1", "delta")
    await deployment.hot_load("s0")
    served = await deployment.complete(PROMPT, **GREEDY)
    cases = [
        ("never-saved", None, "no sampler snapshot 'never-saved'"),
        ("s1", None, "needs incremental_snapshot_metadata"),  # a delta loaded as full
        ("s1", "s1", "names 's1' as its base"),  # the client's chain diverged
    ]
    for identity, previous, message in cases:
        replica = await deployment.hot_load(identity, previous=previous)
        state = replica["loading_state"]
        assert state["stage"] == "error" and state["target_snapshot_identity"] == identity
        assert message in state["message"]
        assert replica["current_snapshot_identity"] == "s0"  # still serving the old one
    assert await deployment.complete(PROMPT, **GREEDY) == {**served, "id": ANY, "created": ANY}


async def test_a_corrupted_delta_ends_in_stage_error(
    deployment: Deployment, snapshots: Snapshots
) -> None:
    snapshots.save("s0")
    snapshots.train()
    delta_dir = snapshots.save("s1", "delta")
    await deployment.hot_load("s0")
    diff_file = delta_dir / "delta.safetensors"
    with safe_open(str(diff_file), framework="pt") as f:
        checksums = f.metadata()
    diffs = load_file(str(diff_file))
    name = sorted(diffs)[0]
    # another valid zstd payload of the right size: only the checksum can tell
    other = {n: t for n, t in diffs.items()}
    donor = sorted(n for n in diffs if diffs[n].shape == diffs[name].shape and n != name)
    if donor:
        other[name] = diffs[donor[0]]
    else:
        other[name] = diffs[name].flip(0)
    save_file(other, str(diff_file), metadata=checksums)
    replica = await deployment.hot_load("s1", previous="s0")
    state = replica["loading_state"]
    assert state["stage"] == "error" and state["target_snapshot_identity"] == "s1"
    assert "does not apply" in state["message"]
    assert replica["current_snapshot_identity"] == "s0"


async def test_batched_generation_equals_one_at_a_time(deployment: Deployment) -> None:
    prompts = [PROMPT, [1, 2], list(range(40, 70)), [7] * 9, PROMPT[:3]]
    fields = {**GREEDY, "max_tokens": 12}
    alone = [await deployment.complete(p, **fields) for p in prompts]
    together = await asyncio.gather(*(deployment.complete(p, **fields) for p in prompts))
    for a, b in zip(alone, together, strict=True):
        assert generated(a) == generated(b)
        assert token_logprobs(a) == pytest.approx(token_logprobs(b), abs=1e-4)


async def test_requests_in_flight_during_a_hot_load_finish_on_their_weights(
    deployment: Deployment, snapshots: Snapshots
) -> None:
    fields = {**GREEDY, "max_tokens": 200}
    before = await deployment.complete(PROMPT, **fields)
    snapshots.train("very different weights " * 3)
    snapshots.train("very different weights " * 3)
    snapshots.save("s0")
    running = asyncio.ensure_future(deployment.complete(PROMPT, **fields))
    await asyncio.sleep(0.05)
    replica = await deployment.hot_load("s0")
    assert replica["loading_state"]["stage"] == "done"
    during = await running
    after = await deployment.complete(PROMPT, **fields)
    assert generated(during) == generated(before)
    assert token_logprobs(during) == pytest.approx(token_logprobs(before), abs=1e-4)
    assert token_logprobs(after) != pytest.approx(token_logprobs(before), abs=1e-4)


async def test_stream_chunks(deployment: Deployment) -> None:
    chunks = await deployment.stream(
        PROMPT, max_tokens=5, logprobs=True, top_logprobs=3, raw_output=True,
        perf_metrics_in_response=True, temperature=0.7, top_p=0.9, top_k=20, seed=5, stop=[],
    )  # fmt: skip
    *tokens, final = chunks
    # tokens arrive in order, one or more per chunk; text and rows concatenate
    rows = [row for c in tokens for row in c["choices"][0]["logprobs"]["content"]]
    assert len(rows) == 5
    assert "".join(c["choices"][0]["text"] for c in tokens) == "".join(r["token"] for r in rows)
    # at temperature 0.7 with top-k/top-p the behaviour policy differs from the model
    assert any(abs(r["logprob"] - r["sampling_logprob"]) > 1e-3 for r in rows)
    for row in rows:
        assert row["sampling_logprob"] <= 0 and row["logprob"] <= 0
        assert len(row["top_logprobs"]) == 3
        assert row["top_logprobs"][0]["logprob"] >= row["logprob"]
        assert all(isinstance(t["token_id"], int) for t in row["top_logprobs"])
    choice = final["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["raw_output"]["prompt_token_ids"] == PROMPT
    assert choice["raw_output"]["completion_token_ids"] == [r["token_id"] for r in rows]
    assert final["usage"]["completion_tokens"] == 5
    assert float(final["perf_metrics"]["prefill-queue-duration"]) >= 0
    # the same seed samples the same tokens
    again = await deployment.stream(
        PROMPT, max_tokens=5, raw_output=True, temperature=0.7, top_p=0.9, top_k=20, seed=5,
        stop=[],
    )  # fmt: skip
    assert again[-1]["choices"][0]["raw_output"] == choice["raw_output"]


async def test_echo_gives_prompt_rows_with_numeric_first_logprob(deployment: Deployment) -> None:
    answer = await deployment.complete(PROMPT, max_tokens=1, echo=True, logprobs=True,
                                       raw_output=True, temperature=1)  # fmt: skip
    choice = answer["choices"][0]
    ids = choice["raw_output"]["completion_token_ids"]
    assert ids[: len(PROMPT)] == PROMPT and len(ids) == len(PROMPT) + 1
    rows = choice["logprobs"]["content"]
    assert len(rows) == len(PROMPT) + 1
    assert rows[0]["logprob"] == 0.0 and rows[0]["sampling_logprob"] is None
    assert all(isinstance(r["logprob"], float) for r in rows)
    assert isinstance(rows[-1]["sampling_logprob"], float)


async def test_n_samples_get_distinct_seeds_and_stops_are_whole_strings(
    deployment: Deployment,
) -> None:
    answer = await deployment.complete(PROMPT, n=4, seed=3, max_tokens=16, raw_output=True,
                                       temperature=1, stop=[])  # fmt: skip
    samples = {tuple(generated(answer, i)) for i in range(4)}
    assert len(samples) > 1  # one seed for all would make them identical
    # a plain-string stop is one stop string, never its characters
    text_stop = "zz-never-generated"
    answer = await deployment.complete(PROMPT, max_tokens=6, temperature=1, seed=1,
                                       raw_output=True, stop=text_stop)  # fmt: skip
    assert len(generated(answer)) == 6 and answer["choices"][0]["finish_reason"] == "length"
    # a token stop ends the generation with "stop", the stop token kept
    first = generated(await deployment.complete(PROMPT, **GREEDY))
    answer = await deployment.complete(PROMPT, **{**GREEDY, "stop": [first[2]]})
    ids = generated(answer)
    assert ids[-1] == first[2] and len(ids) <= 3
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_warmup_probe(deployment: Deployment) -> None:
    answer = await deployment.complete([1, 2], max_tokens=4, temperature=0.0)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


async def test_refusals(deployment: Deployment) -> None:
    url = deployment.url
    body = {"model": deployment.model, "prompt": PROMPT}
    cases: list[tuple[str, str, dict[str, str], object, int, str]] = [
        ("POST", COMPLETIONS_PATH, {}, body, 401, "missing API key"),
        ("POST", COMPLETIONS_PATH, {"Authorization": "Bearer nope"}, body, 401, "invalid"),
        ("POST", COMPLETIONS_PATH, {"X-Api-Key": KEY},
         {**body, "routing_matrix_format": "parquet_v1"}, 400,
         "Extra inputs are not permitted, field: 'routing_matrix_format'"),
        ("POST", COMPLETIONS_PATH, {"X-Api-Key": KEY}, {**body, "prompt": "text"}, 400,
         "prompt: must be a non-empty list of token ids"),
        ("POST", COMPLETIONS_PATH, {"X-Api-Key": KEY}, {**body, "prompt": [10**6]}, 400,
         "outside the vocabulary"),
        ("POST", COMPLETIONS_PATH, {"X-Api-Key": KEY},
         {**body, "model": "accounts/x/deployments/y"}, 400, "is not served here"),
        ("POST", COMPLETIONS_PATH, {"X-Api-Key": KEY}, {**body, "temperature": "hot"}, 400,
         "temperature: must be a number"),
        ("POST", HOT_LOAD_PATH, {"X-Api-Key": KEY}, {"identity": "x"}, 404,
         "fireworks-deployment"),
        ("POST", HOT_LOAD_PATH, {**deployment.headers, "fireworks-model": "other"},
         {"identity": "x"}, 400, "does not match the deployment's base model"),
        ("POST", HOT_LOAD_PATH, deployment.headers, {"identity": "x", "source": "y"}, 400,
         "Extra inputs are not permitted, field: 'source'"),
        ("POST", HOT_LOAD_PATH, deployment.headers,
         {"identity": "x", "incremental_snapshot_metadata": {
             "previous_snapshot_identity": "w", "compression_format": "arc_v3"}},
         400, "compression_format"),
    ]  # fmt: skip
    for method, path, headers, payload, status, message in cases:
        async with deployment.http.request(method, url + path, json=payload, headers=headers) as r:
            answer = await r.json()
            assert r.status == status, (path, payload, answer)
            assert message in answer["error"]["message"], answer
    async with deployment.http.post(
        url + COMPLETIONS_PATH, data=b"{not json", headers={"X-Api-Key": KEY}
    ) as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
    async with deployment.http.post(
        url + COMPLETIONS_PATH,
        data=io.BytesIO(b"x" * (9 * 1024 * 1024)),
        headers={"X-Api-Key": KEY},
    ) as r:
        assert r.status == 413


async def test_a_lora_snapshot_loads_on_the_deployments_base(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path, lora_rank=4)
    snapshots.train()
    snapshots.save("lora-0")
    snapshots.train("more")
    snapshots.save("lora-1", "delta")
    async with Deployment.running(tmp_path) as dep:
        replica = await dep.hot_load("lora-0")
        assert replica["current_snapshot_identity"] == "lora-0", replica
        replica = await dep.hot_load("lora-1", previous="lora-0")
        assert replica["current_snapshot_identity"] == "lora-1", replica
        await _matches_trainer(dep, snapshots)


async def test_an_identity_in_two_jobs_must_be_qualified(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path)
    snapshots.save("s0")
    shutil.copytree(tmp_path / "job-1", tmp_path / "job-2")
    async with Deployment.running(tmp_path) as dep:
        replica = await dep.hot_load("s0")
        assert "several jobs" in replica["loading_state"]["message"]
        replica = await dep.hot_load("cross_job://job-2/s0")
        assert replica["current_snapshot_identity"] == "cross_job://job-2/s0", replica
