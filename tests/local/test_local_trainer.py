"""LocalTrainer as a sync and an async context manager, and what it must never leak."""

from __future__ import annotations

import asyncio
import json
import pickle
import pydoc
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from firetitan.cli import _is_loopback
from firetitan.local import LocalTrainer, ServerConfig, generate_api_key


def get_json(url: str, key: str) -> tuple[int, object]:
    request = urllib.request.Request(url, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_sync_context_runs_on_its_own_thread_and_cleans_up() -> None:
    threads_before = set(threading.enumerate())
    with LocalTrainer("null") as trainer:
        assert trainer.base_url.startswith("http://127.0.0.1:")
        assert trainer.api_key.startswith("tml-")
        assert trainer.job_id.startswith("job-")
        checkpoint_dir = trainer.checkpoint_dir
        assert checkpoint_dir is not None and checkpoint_dir.is_dir()
        url = f"{trainer.base_url}/api/v1/healthz"
        assert get_json(url, trainer.api_key) == (200, {"status": "ok"})
        assert get_json(url, "tml-wrong")[0] == 401
        assert trainer.execution_log == []
    assert not checkpoint_dir.exists()  # a temporary checkpoint folder is removed
    assert set(threading.enumerate()) <= threads_before


@pytest.mark.asyncio
async def test_async_context_with_given_options(tmp_path: Path) -> None:
    async with LocalTrainer(
        "null", checkpoint_dir=tmp_path, job_id="my-job", api_key="tml-fixed"
    ) as trainer:
        assert trainer.api_key == "tml-fixed"
        assert trainer.checkpoint_dir == tmp_path
        job_dir = tmp_path / "my-job"
    # A folder the caller gave is kept, with the job's folder in it.
    assert await asyncio.to_thread(job_dir.is_dir)


def test_the_key_never_shows(tmp_path: Path) -> None:
    trainer = LocalTrainer("null", api_key="tml-secret-key-123")
    assert "tml-secret-key-123" not in repr(trainer)
    assert "tml-secret-key-123" not in str(trainer)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(trainer)


def test_options_are_checked() -> None:
    with pytest.raises(TypeError, match="long_pol"):
        LocalTrainer("null", long_pol=1.0)
    with pytest.raises(ValueError, match="gap_wait_seconds must be positive"):
        LocalTrainer("null", gap_wait_seconds=0)
    with pytest.raises(ValueError, match="engine must be"):
        LocalTrainer("jax")
    assert LocalTrainer("null", long_poll_seconds=1.5).config == ServerConfig(long_poll_seconds=1.5)


def test_torch_engine_import_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "firetitan.local.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'firetitan\[local\]'"):
        LocalTrainer("torch")


def test_startup_failure_is_raised_and_leaves_nothing_behind() -> None:
    threads_before = set(threading.enumerate())
    with LocalTrainer("null") as running:
        port = int(running.base_url.rsplit(":", 1)[1])
        with pytest.raises(OSError), LocalTrainer("null", port=port):
            pass
    assert set(threading.enumerate()) <= threads_before


def test_generated_keys() -> None:
    keys = {generate_api_key() for _ in range(5)}
    assert len(keys) == 5
    assert all(k.startswith("tml-") and len(k) > 40 for k in keys)


def test_loopback_detection() -> None:
    assert _is_loopback("127.0.0.1")
    assert _is_loopback("::1")
    assert _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0")
    assert not _is_loopback("192.168.1.5")
    assert not _is_loopback("example.com")


def test_help_lists_what_a_started_trainer_exposes() -> None:
    text = pydoc.render_doc(LocalTrainer, renderer=pydoc.plaintext)
    attributes = text.split("Attributes:", 1)[1].split("Raises:", 1)[0]
    for name in ("base_url", "job_id", "checkpoint_dir"):
        assert f"{name}: " in attributes
    assert "api_key" in text and "seed: Seeds" in text
    assert "§" not in text and "wire.md" not in text
