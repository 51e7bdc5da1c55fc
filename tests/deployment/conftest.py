"""Fixtures for the local deployment: a trainer-side snapshot writer (a torch engine
and a checkpoint store, no HTTP) and an in-process deployment server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from .helpers import Deployment, Snapshots


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the test machines' two cores are shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def snapshots(tmp_path: Path) -> Snapshots:
    """Exports of one full-parameter model under ``tmp_path`` (job ``job-1``)."""
    return Snapshots(tmp_path)


@pytest_asyncio.fixture
async def deployment(snapshots: Snapshots) -> AsyncIterator[Deployment]:
    """A deployment over ``snapshots``' checkpoint root, with a client for it."""
    async with Deployment.running(snapshots.root) as dep:
        yield dep
