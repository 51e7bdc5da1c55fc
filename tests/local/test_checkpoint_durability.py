"""A checkpoint's files and folders reach the disk before its manifest names them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from firetitan.local.checkpoints import MANIFEST_NAME, CheckpointStore


def test_files_and_folders_are_fsynced_before_the_manifest_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []  # inodes, in the order they were fsynced (renames keep them)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = CheckpointStore(tmp_path, "job")
    inodes: dict[str, int] = {}
    with store.write("state", "step-1", model_id="m") as folder:
        (folder / "weights.bin").write_bytes(b"w" * 1000)
        (folder / "nested").mkdir()
        (folder / "nested" / "optimizer.bin").write_bytes(b"o" * 1000)
        for rel in ("weights.bin", "nested/optimizer.bin", "nested", "."):
            inodes[rel] = (folder / rel).stat().st_ino

    final = tmp_path / "job" / "state" / "step-1"
    manifest_inode = (final / MANIFEST_NAME).stat().st_ino
    manifest_at = synced.index(manifest_inode)
    for rel, inode in inodes.items():
        assert inode in synced[:manifest_at], f"{rel} not fsynced before the manifest"
    # After the manifest: its folder (the manifest's entry), then the parent (the rename).
    assert inodes["."] in synced[manifest_at + 1 :]
    assert (tmp_path / "job" / "state").stat().st_ino == synced[-1]
