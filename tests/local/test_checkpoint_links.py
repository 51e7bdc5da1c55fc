"""Checkpoints are found without following links out of the root, and only where their
manifest says they were committed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local.checkpoints import MANIFEST_NAME, CheckpointStore

# A store under ``root``, and the folder outside the root with another job's checkpoint.
Layout = tuple[CheckpointStore, Path]


def _commit(store: CheckpointStore, kind: str, name: str) -> Path:
    with store.write(kind, name, model_id="m") as folder:  # type: ignore[arg-type]
        (folder / "weights.bin").write_bytes(b"w")
    return store.root / store.job_id / kind / name


def _unresolvable(store: CheckpointStore, *paths: str) -> None:
    """None of ``paths`` resolves to a state checkpoint."""
    for path in paths:
        with pytest.raises(FileNotFoundError):
            store.resolve("state", path)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """A store under ``root`` and, outside the root, a committed checkpoint of a job."""
    outside = CheckpointStore(tmp_path / "elsewhere", "victim")
    _commit(outside, "state", "secret")
    return CheckpointStore(tmp_path / "root", "job"), tmp_path / "elsewhere"


def test_a_job_folder_linking_out_of_the_root_is_not_followed(layout: Layout) -> None:
    store, outside = layout
    (store.root / "victim").symlink_to(outside / "victim", target_is_directory=True)
    assert store.manifest("state", CheckpointRef("secret", job_id="victim")) is None
    with pytest.raises(FileNotFoundError, match="no state checkpoint named 'secret' in job"):
        store.resolve("state", "cross_job://victim/secret")


def test_a_checkpoint_name_linking_out_of_the_root_is_neither_listed_nor_loaded(
    layout: Layout,
) -> None:
    store, outside = layout
    _commit(store, "state", "mine")
    state = store.root / "job" / "state"
    (state / "secret").symlink_to(outside / "victim" / "state" / "secret")
    assert store.names("state") == ["mine"]
    _unresolvable(store, "secret")


def test_a_file_linking_out_of_the_root_spoils_its_checkpoint(layout: Layout) -> None:
    store, outside = layout
    folder = _commit(store, "state", "mine")
    (folder / "weights.bin").unlink()
    (folder / "weights.bin").symlink_to(outside / "victim" / "state" / "secret" / "weights.bin")
    assert store.names("state") == []
    _unresolvable(store, "mine")


def test_links_inside_the_root_and_copies_need_a_manifest_that_agrees(layout: Layout) -> None:
    store, _outside = layout
    folder = _commit(store, "state", "mine")
    shutil.copytree(folder, folder.parent / "copy")  # manifest still says "mine"
    (folder.parent / "alias").symlink_to(folder)  # inside the root, but not "alias"
    other = store.root / "other-job" / "state" / "mine"
    shutil.copytree(folder, other)  # manifest still says job "job"
    assert store.names("state") == ["mine"]
    _unresolvable(store, "copy", "alias", "cross_job://other-job/mine")
    # A manifest that agrees with its place makes it a checkpoint there.
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    (other / MANIFEST_NAME).write_text(json.dumps({**manifest, "job_id": "other-job"}))
    assert store.resolve("state", "cross_job://other-job/mine")[0] == other
