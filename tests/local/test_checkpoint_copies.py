"""`CheckpointStore.copy_to_job`: a copy in another job shares the source's files,
carries its manifest facts, and outlives the source."""

from __future__ import annotations

import time
from pathlib import Path

from firetitan.local.checkpoints import CheckpointStore


def test_a_copy_shares_files_and_outlives_its_source(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job")
    with store.write("state", "step-1", model_id="m", metadata={"model_spec": {"x": 1}}) as d:
        (d / "sub").mkdir()
        (d / "sub" / "weights.bin").write_bytes(b"weights")
    copy = store.copy_to_job("state", "step-1", "copy-1", ttl_seconds=3600, metadata={"k": "v"})
    assert (copy.job_id, copy.name, copy.model_id) == ("copy-1", "step-1", "m")
    assert copy.metadata == {"model_spec": {"x": 1}, "k": "v"}
    assert copy.expires_at is not None and copy.expires_at > time.time()
    source_file = tmp_path / "job" / "state" / "step-1" / "sub" / "weights.bin"
    copied_file = tmp_path / "copy-1" / "state" / "step-1" / "sub" / "weights.bin"
    assert source_file.stat().st_ino == copied_file.stat().st_ino  # no bytes duplicated
    store.delete("state", "step-1")
    directory, manifest = store.resolve("state", "cross_job://copy-1/step-1")
    assert (directory / "sub" / "weights.bin").read_bytes() == b"weights"
    assert manifest == copy
    assert store.names("state") == []  # the copy belongs to the other job
