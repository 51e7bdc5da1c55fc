"""Sampler exports survive their names and TTLs: re-saving a name never makes a delta
of itself, an export others build on is neither replaced nor swept while they live,
and failures never show the trainer's file paths."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local import LocalTrainer

from .conftest import ModelFactory
from .helpers import Api, optim_body

pytestmark = pytest.mark.asyncio


def export_body(model: str, seq: int, path: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_id": model,
        "path": path,
        "seq_id": seq,
        "type": "save_weights_for_sampler",
        "checkpoint_type": kind,
        **extra,
    }


async def sample_outcome(api: Api, path: str, seq: int) -> dict[str, Any]:
    request = {
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 2, "seed": 7, "temperature": 1.0},
        "model_path": path,
        "seq_id": seq,
        "type": "sample",
    }
    return await api.outcome(await api.submit("asample", request))


def metadata(trainer: LocalTrainer, name: str) -> dict[str, Any]:
    manifest = trainer.server.store.manifest("sampler", CheckpointRef(name))
    assert manifest is not None
    return manifest.metadata


async def test_saving_a_delta_under_its_own_base_name_writes_a_base(
    make_model: ModelFactory,
) -> None:
    async with make_model(engine="torch") as (trainer, api, model):
        seq = 0
        for _ in range(3):  # "latest" every few steps, as an RL loop does
            await api.result(await api.submit("optim_step", optim_body(model, seq := seq + 1)))
            save = export_body(model, seq := seq + 1, "latest", "delta")
            await api.result(await api.submit("save_weights_for_sampler", save))
            assert "sequences" in await sample_outcome(api, "latest", seq)
        meta = metadata(trainer, "latest")
        assert meta["checkpoint_type"] == "base"
        assert meta["fallback_reason"] == (
            "it replaces 'latest', the export it would be a difference to: written with the "
            "full weights, which load to exactly the current weights"
        )
        # A delta on another name is still a delta.
        save = export_body(model, seq + 1, "next", "delta")
        await api.result(await api.submit("save_weights_for_sampler", save))
        assert metadata(trainer, "next")["delta_of"] == "latest"
        assert "sequences" in await sample_outcome(api, "next", seq + 2)


async def test_an_export_others_build_on_is_not_replaced(make_model: ModelFactory) -> None:
    async with make_model() as (_trainer, api, model):
        await api.result(
            await api.submit("save_weights_for_sampler", export_body(model, 1, "a", "base"))
        )
        await api.result(
            await api.submit("save_weights_for_sampler", export_body(model, 2, "b", "delta"))
        )
        outcome = await api.outcome(
            await api.submit("save_weights_for_sampler", export_body(model, 3, "a", "base"))
        )
        assert outcome["category"] == "user"
        assert outcome["error"] == (
            "sampler export 'a' cannot be replaced: the delta export(s) 'b' are built on it; "
            "save under another name"
        )


async def test_ttl_sweeps_only_exports_nothing_live_builds_on(
    make_model: ModelFactory,
) -> None:
    async with make_model(engine="torch") as (trainer, api, model):
        scratch = export_body(model, 1, "scratch", "base", ttl_seconds=1)
        await api.result(await api.submit("save_weights_for_sampler", scratch))
        keep = export_body(model, 2, "keep", "delta")
        await api.result(await api.submit("save_weights_for_sampler", keep))
        assert metadata(trainer, "keep")["delta_of"] == "scratch"
        short = export_body(model, 3, "short", "base", ttl_seconds=1)
        await api.result(await api.submit("save_weights_for_sampler", short))
        assert trainer.checkpoint_dir is not None
        sampler_dir = trainer.checkpoint_dir / trainer.job_id / "sampler"
        for _ in range(200):  # the sweeper runs every 50 ms
            if not (sampler_dir / "short").exists():
                break
            await asyncio.sleep(0.05)
        assert not (sampler_dir / "short").exists()  # expired, nothing builds on it
        assert (sampler_dir / "scratch").is_dir()  # expired, but "keep" is a delta on it
        assert "sequences" in await sample_outcome(api, "keep", 4)
        outcome = await sample_outcome(api, "scratch", 5)  # expired exports do not load
        assert outcome["category"] == "user"


async def test_export_failures_never_show_server_paths(make_model: ModelFactory) -> None:
    async with make_model(engine="torch") as (trainer, api, model):
        await api.result(
            await api.submit("save_weights_for_sampler", export_body(model, 1, "a", "base"))
        )
        await api.result(
            await api.submit("save_weights_for_sampler", export_body(model, 2, "b", "delta"))
        )
        assert trainer.checkpoint_dir is not None
        # The base of "b" is damaged behind the trainer's back.
        base = trainer.checkpoint_dir / trainer.job_id / "sampler" / "a"
        for child in base.iterdir():
            if child.suffix == ".json" and child.name != "firetitan-checkpoint.json":
                child.write_text("{}")
        outcome = await sample_outcome(api, "b", 3)
        assert outcome["category"] == "user", outcome
        assert str(trainer.checkpoint_dir) not in outcome["error"]
        assert "'a'" in outcome["error"] or "/a" in outcome["error"]
