"""tinker-cookbook 0.6.1's own loops, unchanged, on the local trainer (torch engine, tiny
stand-in) through the tinker 0.38 SDK with its default client configuration: the SFT
loop with an interrupted run resumed from its checkpoints, the RL loop in synchronous
and asynchronous modes with each loss the cookbook offers, ``weights.download`` and the
tinker ``RestClient``. Only the tokenizer lookup is pointed at a byte tokenizer
(``cookbook_flow.py``), as a user without a model hub would configure it.

Each loop runs in a child process (``sdk_child.py`` says why); a few steps each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shared import BASE_MODEL

from firetitan.local import LocalTrainer

from .sdk_child import run_flow

pytest.importorskip("firetitan.local.torch", reason="needs the local extra")
pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook")



@pytest.fixture(scope="module")
def trainer() -> Iterator[LocalTrainer]:
    # A long poll longer than any request here, so the SDK never sees a try_again.
    with LocalTrainer("torch", size="tiny", device="cpu", long_poll_seconds=20.0) as t:
        yield t


def cookbook(trainer: LocalTrainer, mode: str, log_path: Path, **spec: Any) -> dict[str, Any]:
    body = {"mode": mode, "base_model": BASE_MODEL, "log_path": str(log_path), **spec}
    report = run_flow("tests.compat.cookbook_flow", trainer, stdin=json.dumps(body), timeout=240)
    assert report["problems"] == []  # the SDK logged no warning or error
    return report


def rows(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def checkpoints(log_path: Path) -> list[dict[str, Any]]:
    text = (log_path / "checkpoints.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_sft_resumes_with_one_row_per_step(trainer: LocalTrainer, tmp_path: Path) -> None:
    assert cookbook(trainer, "sft", tmp_path, steps=6, crash_at=4)["interrupted"]
    assert [c["name"] for c in checkpoints(tmp_path)] == ["000002"]
    assert not cookbook(trainer, "sft", tmp_path, steps=6)["interrupted"]
    steps = [r["step"] for r in rows(tmp_path)]
    assert steps == list(range(6))  # integer steps, none twice, none lost by the resume
    assert all(type(s) is int for s in steps)
    # The trainer's optimizer metrics sit beside the loop's own keys, never over them.
    assert all("optim_step:max" in r and "learning_rate" in r for r in rows(tmp_path))
    log = (tmp_path / "logs.log").read_text()
    assert "Resumed training from tinker://" in log
    assert "Renderer metadata matches" in log  # read back through training_runs/{id}


#: (mode, loss_fn) of each RL run: both modes with their defaults, and every other
#: built-in loss the cookbook's RL loop (``rl.train``, typed by tinker's ``LossFnType``)
#: can train with.
RL_RUNS = [
    ("sync", None),  # the cookbook's default, importance_sampling
    ("async", None),  # the async default, stable_reinforce: stability records, provenance
    ("sync", "ppo"),
    ("sync", "cispo"),
    ("sync", "dro"),
    ("sync", "gspo"),  # rl.train sends no sequence_ratio_mask: the loss tokens stand in
    ("sync", "stable_reinforce"),
]


def test_rl_loop_modes_and_losses(trainer: LocalTrainer, tmp_path: Path) -> None:
    runs = [
        {"log_path": str(tmp_path / f"{mode}-{loss}"), "async": mode == "async", "loss_fn": loss}
        for mode, loss in RL_RUNS
    ]
    cookbook(trainer, "rl", tmp_path, steps=3, runs=runs)
    defaults = {"sync": "importance_sampling", "async": "stable_reinforce"}
    for (mode, loss), run in zip(RL_RUNS, runs, strict=True):
        log_path = Path(run["log_path"])
        config = json.loads((log_path / "config.json").read_text())
        trained_with = config["async_config"]["loss_fn"] if run["async"] else config["loss_fn"]
        assert trained_with == (loss or defaults[mode])
        trained = [r for r in rows(log_path) if "optim_step:max" in r]
        assert [r["step"] for r in trained] == [0, 1, 2], run
        assert all(type(r["step"]) is int for r in trained)
        assert checkpoints(log_path)[-1]["name"] == "final"


def test_rl_loop_resumes_with_one_row_per_step(trainer: LocalTrainer, tmp_path: Path) -> None:
    """Stopped at batch 3, after its checkpoint at batch 2, and run again on the same log
    directory: the loop resumes from that checkpoint, drops the rows logged from it on,
    and ends with one row per step (and its closing row of token totals)."""
    run = {"log_path": str(tmp_path), "crash_at": 3}
    first = cookbook(trainer, "rl", tmp_path, steps=5, runs=[run])
    assert first["interrupted"] == [str(tmp_path)]
    assert [c["name"] for c in checkpoints(tmp_path)] == ["000002"]
    again = cookbook(trainer, "rl", tmp_path, steps=5, runs=[{"log_path": str(tmp_path)}])
    assert again["interrupted"] == []
    steps = [r["step"] for r in rows(tmp_path)]
    assert steps == list(range(6))  # integer steps, none twice, none lost by the resume
    assert all(type(s) is int for s in steps)
    trained = [r["step"] for r in rows(tmp_path) if "optim_step:max" in r]
    assert trained == list(range(5))
    assert [r["optim_step:max"] for r in rows(tmp_path)[:5]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in checkpoints(tmp_path)] == ["000002", "000004", "final"]
    assert "Resumed training from tinker://" in (tmp_path / "logs.log").read_text()


def test_weights_download_and_rest_client(trainer: LocalTrainer, tmp_path: Path) -> None:
    cookbook(trainer, "sft", tmp_path, steps=3)  # checkpoints 000002 and final
    first, final = checkpoints(tmp_path)[0], checkpoints(tmp_path)[-1]
    # A training checkpoint: loaded into a new run, exported encrypted to a fresh key,
    # downloaded through signed URLs, decrypted, and the export deleted.
    out = tmp_path / "adapter"
    files = cookbook(trainer, "download", tmp_path, tinker_path=final["state_path"], out=str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files["files"])
    assert trainer.server.store.names("external") == []

    rest = cookbook(trainer, "rest", tmp_path, tinker_path=first["state_path"])
    assert rest["run"]["training_run_id"] == trainer.job_id
    assert rest["run"]["base_model"] == BASE_MODEL
    assert rest["run"]["lora_rank"] == 4
    assert first["state_path"] in rest["before"]
    assert first["state_path"] not in rest["after"]
    assert set(rest["after"]) == set(rest["before"]) - {first["state_path"]}
    assert rest["renderer"] == "role_colon"
