from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from firetitan.local.torch import TorchEngine


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run these tests on one intra-op thread.

    The test machines have two cores shared with other jobs; under that contention
    torch's spinning OpenMP workers make the tiny models 5-20x slower than one thread.
    `test_torch_determinism` switches back to several threads on purpose.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def engine() -> TorchEngine:
    """A tiny stand-in engine on the CPU (float32), seed 0."""
    return TorchEngine(size="tiny", device="cpu", seed=0)
