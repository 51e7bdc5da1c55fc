"""The checkpoint store replaces an existing checkpoint only when asked (``save_state``'s
``overwrite``), also when another writer commits the same name first."""

from __future__ import annotations

from pathlib import Path

import pytest

from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local.checkpoints import CheckpointStore


def _save(store: CheckpointStore, name: str, body: bytes, *, replace: bool = True) -> None:
    with store.write("state", name, model_id="m", replace=replace) as folder:
        (folder / "weights.bin").write_bytes(body)


def test_an_existing_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job")
    _save(store, "s", b"first")
    with (
        pytest.raises(FileExistsError, match="a state checkpoint named 's' exists"),
        store.write("state", "s", model_id="m", replace=False),
    ):
        raise AssertionError("the body must not run")
    assert (tmp_path / "job" / "state" / "s" / "weights.bin").read_bytes() == b"first"
    _save(store, "s", b"second")  # replace, the default
    assert (tmp_path / "job" / "state" / "s" / "weights.bin").read_bytes() == b"second"


def test_a_name_committed_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job")
    with (
        pytest.raises(FileExistsError),
        store.write("state", "s", model_id="m", replace=False) as folder,
    ):
        (folder / "weights.bin").write_bytes(b"late")
        _save(store, "s", b"first")  # another model saves the same name first
    assert (tmp_path / "job" / "state" / "s" / "weights.bin").read_bytes() == b"first"
    assert store.names() == ["s"]
    assert not list((tmp_path / "job" / ".tmp").iterdir())  # the refused folder is gone


def test_an_expired_checkpoint_does_not_block_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, "job")
    with store.write("state", "s", model_id="m", ttl_seconds=1.0):
        pass
    manifest = store.manifest("state", CheckpointRef("s"))
    assert manifest is not None and manifest.expires_at is not None
    monkeypatch.setattr("time.time", lambda: manifest.expires_at + 1)
    _save(store, "s", b"new", replace=False)
    assert (tmp_path / "job" / "state" / "s" / "weights.bin").read_bytes() == b"new"
