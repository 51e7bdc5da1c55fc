"""``device="auto"`` leaves process-wide torch settings alone; determinism is opt-in.

The CUDA branch is taken here with ``torch.cuda.is_available`` patched (and the engine's
sampling generator kept on the CPU): building the engine does no other CUDA work until a
model is created, so the settings it makes, or does not make, can be checked on any
machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from firetitan.local.torch import TorchEngine


def settings() -> tuple[bool, bool, bool, str | None]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


@pytest.fixture
def pretend_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        TorchEngine, "_generator", lambda _self, seed: torch.Generator().manual_seed(seed)
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = settings()
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]
    torch.backends.cuda.matmul.allow_tf32 = before[2]


def test_auto_picks_cuda_without_changing_process_settings(pretend_cuda: None) -> None:
    before = settings()
    engine = TorchEngine(device="auto")
    assert engine.device.type == "cuda"
    assert settings() == before


def test_determinism_is_made_process_wide_only_when_asked(pretend_cuda: None) -> None:
    engine = TorchEngine(device="auto", deterministic=True)
    assert engine.device.type == "cuda"
    assert settings() == (True, False, False, ":4096:8")


def test_cpu_ignores_the_cuda_determinism_switch() -> None:
    before = settings()
    TorchEngine(device="cpu", deterministic=True)
    assert settings() == before
