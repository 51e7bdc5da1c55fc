"""Fixtures for the facade tests: a generated toy facade, and a local trainer on loopback.

The toy async core (`toykit`) follows the async-core <-> facade contract and has knobs
the trainer lacks (steps of any duration, a visible send queue); the tests generate its
facade with `scripts/gen_sync.py`, exactly as `firetitan/_sync` is generated. Behaviour
that a real trainer can show (ordering, execution log, checkpoints) is tested through
the real facade against `LocalTrainer`.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tinker
from shared import BASE_MODEL

from firetitan import FiretitanServiceClient, FiretitanTrainingClient
from firetitan.local import LocalTrainer
from firetitan.local.null_engine import NullEngine

ROOT = Path(__file__).resolve().parents[2]
GEN_SYNC = ROOT / "scripts" / "gen_sync.py"
TOYKIT_ASYNC = Path(__file__).resolve().parent / "toykit" / "_async"

# Short server waits so that the behaviour under test happens quickly.
FAST: dict[str, Any] = {"long_poll_seconds": 2.0, "maintenance_interval_seconds": 0.05}


def generate_toy(directory: Path) -> Path:
    """Generate the toy facade package into `directory/toykit_sync`; return its path."""
    out = directory / "toykit_sync"
    subprocess.run(
        [sys.executable, str(GEN_SYNC), "--src", str(TOYKIT_ASYNC), "--dst", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The generated toy facade package (`toykit_sync`)."""
    out = generate_toy(tmp_path_factory.mktemp("toy"))
    sys.path.insert(0, str(out.parent))
    return importlib.import_module("toykit_sync")


@pytest.fixture
def toy_service(toy: ModuleType) -> Iterator[Any]:
    service = toy.ToyService("http://toy.invalid", "key")
    yield service
    service.close()


@pytest.fixture(scope="session")
def trainer() -> Iterator[LocalTrainer]:
    """A null-engine trainer shared by the tests of the session."""
    with LocalTrainer("null", **FAST) as local:
        yield local


@pytest.fixture
def service(trainer: LocalTrainer) -> Iterator[FiretitanServiceClient]:
    client = FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key)
    yield client
    client.close()


@pytest.fixture
def training(service: FiretitanServiceClient) -> FiretitanTrainingClient:
    return service.create_training_client(base_model=BASE_MODEL, lora_rank=0)


def datum(n: int = 8, offset: int = 1) -> tinker.Datum:
    """A small next-token datum (`n` tokens)."""
    tokens = np.arange(offset, offset + n, dtype=np.int64)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(tokens[1:]),
            "weights": tinker.TensorData.from_numpy(np.ones(n - 1, dtype=np.float32)),
        },
    )


class SlowEngine(NullEngine):
    """A null engine whose `forward_backward` waits until `release` is set (or 30 s)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.started = threading.Event()

    def forward_backward(
        self,
        model_id: str,
        data: Sequence[tinker.Datum],
        loss_fn: str,
        loss_fn_config: Any,
    ) -> tinker.ForwardBackwardOutput:
        self.started.set()
        self.release.wait(30)
        return super().forward_backward(model_id, data, loss_fn, loss_fn_config)


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until true (bounded; a deadline failure names `what`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
