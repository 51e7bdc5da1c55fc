"""Wire parity with the public Fireworks training SDK: the same scripted flow, run by
firetitan and by fireworks-ai 1.2.30 through a recording proxy, sends the same
endpoints, the same JSON fields and the same protocol headers (values may differ)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import tinker
from compat.sdk_child import child_environment
from faults import FaultProxy, Recorded
from shared import connect, shifted_datum

from firetitan import GradAccNormalization
from firetitan.local import LocalTrainer

from .helpers import BASE_MODEL, FAST_TRAINER

FLOW = Path(__file__).with_name("fireworks_parity_flow.py")
TOKENS = [[1, 2, 3, 4], [5, 6, 7]]
KEY = "tml-parity-test-key"
# Background traffic whose timing differs between runs; not part of the flow.
BACKGROUND = {"/api/v1/telemetry", "/api/v1/session_heartbeat"}


async def firetitan_flow(base_url: str, api_key: str) -> None:
    """The steps of ``fireworks_parity_flow.py``, with firetitan."""
    async with connect(base_url, api_key, user_metadata={"run": "parity"}) as service:
        client = await service.create_training_client(BASE_MODEL, lora_rank=0)
        data = [shifted_datum(tinker, t) for t in TOKENS]
        await client.forward(data, "cross_entropy")
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(
            tinker.AdamParams(learning_rate=1e-4),
            grad_accumulation_normalization=GradAccNormalization.NUM_LOSS_TOKENS,
        )
        await fb
        await opt
        await client.save_state("step-1")
        await client.list_checkpoints()
        await client.load_state_with_optimizer(client.resolve_checkpoint_path("step-1"))
        await client.save_weights_for_sampler_ext("sampler", checkpoint_type="base")
        await client.get_info()


async def fireworks_flow(base_url: str, api_key: str) -> None:
    env = child_environment(base_url, api_key, {"TINKER_TELEMETRY": "0"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FLOW), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), timeout=100)
    assert proc.returncode == 0, err.decode()[-4000:]


def shape(value: Any, prefix: str = "") -> set[str]:
    """The key paths of a JSON value (list items merged under ``[]``)."""
    if isinstance(value, dict):
        paths = set()
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= shape(item, path)
        return paths
    if isinstance(value, list):
        return set().union(*(shape(item, prefix + "[]") for item in value)) if value else set()
    return set()


def by_endpoint(records: list[Recorded]) -> dict[tuple[str, str], list[Recorded]]:
    out: dict[tuple[str, str], list[Recorded]] = {}
    for record in records:
        if record.path not in BACKGROUND:
            out.setdefault((record.method, record.path), []).append(record)
    return out


def headers(record: Recorded) -> dict[str, str]:
    """The record's headers by lower-case name (HTTP names are case-insensitive)."""
    return {name.lower(): value for name, value in record.headers.items()}


@pytest.mark.asyncio
async def test_firetitan_sends_what_the_fireworks_sdk_sends() -> None:
    recorded = {}
    for name, flow in (("fireworks", fireworks_flow), ("firetitan", firetitan_flow)):
        async with (
            LocalTrainer("null", api_key=KEY, **FAST_TRAINER) as trainer,
            FaultProxy(trainer.base_url) as proxy,
        ):
            await flow(proxy.base_url, trainer.api_key)
            recorded[name] = by_endpoint(proxy.records)
    theirs, ours = recorded["fireworks"], recorded["firetitan"]
    assert sorted(ours) == sorted(theirs)
    for endpoint, their_requests in theirs.items():
        our_requests = ours[endpoint]
        their_fields = set().union(*(shape(r.body) for r in their_requests))
        our_fields = set().union(*(shape(r.body) for r in our_requests))
        assert our_fields == their_fields, endpoint
        for record in our_requests + their_requests:
            names = headers(record)
            assert {"x-api-key", "accept", "user-agent"} <= set(names), endpoint
            if record.method == "POST":
                assert {"x-idempotency-key", "content-type"} <= set(names), endpoint
                assert names["content-type"].startswith("application/json")
        assert {headers(r)["x-api-key"] for r in our_requests + their_requests} == {KEY}
    # One idempotency key per call (no retries happened here).
    posts = [r for rs in ours.values() for r in rs if r.method == "POST"]
    assert len({headers(r)["x-idempotency-key"] for r in posts}) == len(posts)
