"""``firetitan serve`` with pause points inside checkpoint writes, so that a test can kill
the trainer at an exact moment of a write.

Run as ``python hooked_serve.py serve <firetitan serve arguments>``. Pause points are
armed by marker files in the folder named by ``FIRETITAN_TEST_PAUSE_DIR``:

* ``write-<kind>-<name>``: after the engine wrote every file of checkpoint ``name``
  (kind ``state`` or ``sampler``) into its temporary folder, before the store writes
  the manifest and renames the folder into place;
* ``swap-<kind>-<name>``: while replacing an existing checkpoint ``name``, between the
  rename that moves the old folder aside and the one that moves the new folder in.

At a pause the process prints ``PAUSED <point> <kind> <name>`` and waits (at most two
minutes) while the marker exists: deleting it resumes the write; killing the process
interrupts it at exactly that point.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from firetitan.cli import main
from firetitan.local import checkpoints
from firetitan.local.checkpoints import CheckpointStore

PAUSE_DIR = Path(os.environ["FIRETITAN_TEST_PAUSE_DIR"])
MAX_PAUSE_S = 120.0


def _pause(point: str, kind: str, name: str) -> None:
    marker = PAUSE_DIR / f"{point}-{kind}-{name}"
    if not marker.exists():
        return
    print(f"PAUSED {point} {kind} {name}", flush=True)
    deadline = time.monotonic() + MAX_PAUSE_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


_write = CheckpointStore.write


@contextlib.contextmanager
def _paused_write(self: CheckpointStore, kind: Any, name: str, **options: Any) -> Iterator[Path]:
    with _write(self, kind, name, **options) as folder:
        yield folder
        # The engine has written everything; the manifest and the rename come next.
        _pause("write", kind, name)


class _PausingOs:
    """``os`` as the checkpoint store sees it, pausing after the first rename of a
    replacement (the one that moves the old checkpoint aside)."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(os, attr)

    @staticmethod
    def rename(src: Any, dst: Any) -> None:
        os.rename(src, dst)
        source, target = Path(src), Path(dst)
        if target.name.startswith("old-"):
            _pause("swap", source.parent.name, source.name)


CheckpointStore.write = _paused_write  # type: ignore[method-assign]
checkpoints.os = _PausingOs()  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main())
