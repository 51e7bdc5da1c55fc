"""Where the local trainer keeps checkpoints, and how a checkpoint becomes valid.

Layout under the checkpoint root, one folder per job so that ``cross_job://`` can reach
another job's checkpoints::

    <root>/<job_id>/state/<name>/      save_state checkpoints (weights + optimizer)
    <root>/<job_id>/sampler/<name>/    save_weights_for_sampler exports
    <root>/<job_id>/external/<name>/   save_weights_external exports (downloadable)
    <root>/<job_id>/.tmp/              checkpoints being written

A checkpoint is valid only once its folder sits under its kind's folder with a
``MANIFEST_NAME`` file in it. An engine writes into a fresh folder under ``.tmp/``; the
store then fsyncs its files and folders, writes the manifest and renames the folder
into place. A rename within one file system is atomic, so a crash mid-write leaves only
debris in ``.tmp/`` (removed at the next start), never a checkpoint that lists as valid,
and a power loss never leaves a manifest naming files whose data was not on disk.

Every name passes `firetitan._checkpoint_paths.validate_name` before it touches the file system.
Nothing here unpickles: manifests are JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import attrs

from firetitan._checkpoint_paths import CheckpointRef, parse_checkpoint_path, validate_name

__all__ = ["KINDS", "MANIFEST_NAME", "CheckpointStore", "CopyOptions", "Kind", "Manifest"]

MANIFEST_NAME = "firetitan-checkpoint.json"
Kind = Literal["state", "sampler", "external"]
KINDS: tuple[Kind, ...] = ("state", "sampler", "external")


@attrs.frozen(kw_only=True)
class Manifest:
    """What the store records about a committed checkpoint."""

    kind: str
    name: str
    job_id: str
    model_id: str
    created_at: float
    expires_at: float | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class CopyOptions(TypedDict, total=False):
    """What `CheckpointStore.copy_to_job` sets on a copy, as `CheckpointStore.write` takes it.

    Attributes:
        ttl_seconds: Delete the copy this many seconds after it is made.
        metadata: Added to the source's manifest metadata.
    """

    ttl_seconds: float | None
    metadata: dict[str, Any] | None


class CheckpointStore:
    """Checkpoint folders of one job, plus read access to other jobs under the same root.

    Thread-safe: the executor's worker thread writes while the event loop lists.
    """

    def __init__(self, root: Path | str, job_id: str) -> None:
        self.root = Path(root).resolve()
        self.job_id = validate_name(job_id, "job id")
        self._lock = threading.Lock()
        self._job_dir.mkdir(parents=True, exist_ok=True)
        self._restore_replaced()
        # Debris of writes that a crash interrupted: never valid, safe to drop.
        shutil.rmtree(self._job_dir / ".tmp", ignore_errors=True)

    def _restore_replaced(self) -> None:
        """Undo a replacement that a crash cut between its two renames.

        Replacing checkpoint ``name`` moves the old folder to ``.tmp/old-<hex>`` and
        then the new one into place. A crash between the two leaves the name empty and
        the old, committed checkpoint in ``.tmp``, which the start-up clean-up would
        delete: put it back instead, so that a crash never loses a committed checkpoint.
        (The new one was never acknowledged; it is debris.)
        """
        for aside in sorted((self._job_dir / ".tmp").glob("old-*")):
            try:
                raw = json.loads((aside / MANIFEST_NAME).read_text())
                kind, name = raw["kind"], raw["name"]
                if kind not in KINDS:
                    continue
                final = self._dir(kind, name)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a committed checkpoint
            if not final.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(aside, final)

    @property
    def _job_dir(self) -> Path:
        return self.root / self.job_id

    def _dir(self, kind: Kind, name: str, job_id: str | None = None) -> Path:
        job = self.job_id if job_id is None else validate_name(job_id, "job id")
        return self.root / job / kind / validate_name(name)

    @contextlib.contextmanager
    def write(
        self,
        kind: Kind,
        name: str,
        *,
        model_id: str,
        ttl_seconds: float | None = None,
        metadata: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Iterator[Path]:
        """Give the caller an empty folder to write a checkpoint into, then commit it.

        If the body raises, nothing is committed and the partial folder is removed.
        An existing checkpoint of the same name is replaced only after the new one is
        complete.

        Args:
            kind: ``"state"`` or ``"sampler"``.
            name: The checkpoint name (validated).
            model_id: The model it came from.
            ttl_seconds: Delete it this many seconds after it is written.
            metadata: Extra JSON-able facts to record in the manifest.
            job_id: Another job to write it for (`copy_to_job`); None: this job.

        Yields:
            The folder to write into.

        Raises:
            ValueError: The name or job id is invalid or ``ttl_seconds`` is not positive.
        """
        final = self._dir(kind, name, job_id)
        job_dir = final.parent.parent
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        tmp = job_dir / ".tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            yield tmp
            # Durable before it can list as valid: after a power loss, a manifest must
            # never name files whose data never reached the disk.
            _fsync_tree(tmp)
            now = time.time()
            manifest = Manifest(
                kind=kind,
                name=name,
                job_id=job_dir.name,
                model_id=model_id,
                created_at=now,
                expires_at=None if ttl_seconds is None else now + ttl_seconds,
                metadata=dict(metadata or {}),
            )
            _write_json(tmp / MANIFEST_NAME, attrs.asdict(manifest))
            _fsync(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                if final.exists():
                    trash = job_dir / ".tmp" / f"old-{uuid.uuid4().hex}"
                    os.rename(final, trash)
                    os.rename(tmp, final)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.rename(tmp, final)
                _fsync(final.parent)  # the rename itself
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def copy_to_job(
        self, kind: Kind, path: str, job_id: str, **commit: Unpack[CopyOptions]
    ) -> Manifest:
        """Copy a valid checkpoint into another job, under the same name, sharing its
        files (hard links; a byte copy only where the file system has none). Checkpoint
        files are never rewritten in place, so the two stay equal; deleting one leaves
        the other whole.

        Args:
            kind: ``"state"`` or ``"sampler"``.
            path: The source, as `resolve` takes it.
            job_id: The job that receives the copy.
            **commit: `CopyOptions`: the copy's TTL, and metadata added to the source's.

        Returns:
            The copy's manifest.

        Raises:
            ValueError: A malformed path or job id, or a bad ``ttl_seconds``.
            FileNotFoundError: No valid source checkpoint.
        """
        _directory, source = self.resolve(kind, path)
        files = self.files(kind, path)
        with self.write(
            kind,
            source.name,
            model_id=source.model_id,
            ttl_seconds=commit.get("ttl_seconds"),
            metadata={**source.metadata, **(commit.get("metadata") or {})},
            job_id=validate_name(job_id, "job id"),
        ) as folder:
            for relative, file in files.items():
                target = folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(file, target)
                except OSError:
                    shutil.copy2(file, target)
        copied = self._committed(kind, source.name, job_id)
        assert copied is not None  # just committed
        return copied

    def manifest(self, kind: Kind, ref: CheckpointRef) -> Manifest | None:
        """Return the manifest of a valid, unexpired checkpoint, or None."""
        manifest = self._committed(kind, ref.name, ref.job_id)
        if manifest is None or manifest.expired(time.time()):
            return None
        return manifest

    def _committed(self, kind: Kind, name: str, job_id: str | None = None) -> Manifest | None:
        """The manifest of a committed checkpoint, expired or not, or None.

        Committed here means: the folder and everything in it stay inside the root once
        links are resolved (a link out of the root is never followed), and the manifest
        names the kind, job and name of the place it sits in (a folder copied or linked
        elsewhere is not a checkpoint there).
        """
        folder = self._dir(kind, name, job_id)
        if not self._contained(folder):
            return None
        try:
            manifest = Manifest(**json.loads((folder / MANIFEST_NAME).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        where = (kind, self.job_id if job_id is None else job_id, name)
        return manifest if (manifest.kind, manifest.job_id, manifest.name) == where else None

    def _contained(self, folder: Path) -> bool:
        """Whether ``folder`` and its entries resolve to places inside the root."""
        try:
            if not folder.resolve().is_relative_to(self.root):
                return False
            return all(
                child.resolve().is_relative_to(self.root)
                for child in folder.iterdir()
                if child.is_symlink()
            )
        except OSError:  # missing, or a link loop
            return False

    def resolve(self, kind: Kind, path: str) -> tuple[Path, Manifest]:
        """Find a valid checkpoint by the path a client sent.

        Args:
            kind: ``"state"`` or ``"sampler"``.
            path: A bare name or ``cross_job://<job_id>/<name>``.

        Returns:
            The checkpoint folder and its manifest.

        Raises:
            ValueError: The path is malformed.
            FileNotFoundError: No valid checkpoint has that name (message names it).
        """
        ref = parse_checkpoint_path(path)
        manifest = self.manifest(kind, ref)
        if manifest is None:
            where = f"job {ref.job_id!r}" if ref.job_id else "this job"
            raise FileNotFoundError(f"no {kind} checkpoint named {ref.name!r} in {where}")
        return self._dir(kind, ref.name, ref.job_id), manifest

    def names(self, kind: Kind = "state") -> list[str]:
        """Names of this job's valid, unexpired checkpoints, sorted naturally
        (``step-2`` before ``step-10``)."""
        now = time.time()
        names = [m.name for m in self._manifests(kind) if not m.expired(now)]
        return sorted(names, key=_natural_key)

    def dependents(self, name: str) -> list[str]:
        """Names of this job's unexpired sampler exports that are deltas on the sampler
        export ``name`` (recorded as ``delta_of`` in their manifests)."""
        now = time.time()
        return sorted(
            m.name
            for m in self._manifests("sampler")
            if m.metadata.get("delta_of") == name and not m.expired(now)
        )

    def sweep(self) -> list[str]:
        """Delete this job's expired checkpoints; return their names.

        An expired sampler export that an unexpired one builds on (through a chain of
        ``delta_of`` links) is kept until nothing live needs it: deleting it would break
        every export diffed against it.
        """
        now = time.time()
        sampler = {m.name: m for m in self._manifests("sampler")}
        needed: set[str] = set()
        for manifest in sampler.values():
            if manifest.expired(now):
                continue
            link = manifest.metadata.get("delta_of")
            while isinstance(link, str) and link not in needed and link in sampler:
                needed.add(link)
                link = sampler[link].metadata.get("delta_of")
        removed = []
        for kind in KINDS:
            for manifest in self._manifests(kind):
                if manifest.expired(now) and not (kind == "sampler" and manifest.name in needed):
                    with self._lock:
                        shutil.rmtree(self._dir(kind, manifest.name), ignore_errors=True)
                    removed.append(manifest.name)
        return removed

    def _manifests(self, kind: Kind) -> list[Manifest]:
        """The manifests of this job's committed checkpoints of ``kind``, expired or not."""
        base = self._job_dir / kind
        if not base.is_dir():
            return []
        found = (self._committed(kind, c.name) for c in base.iterdir() if _valid(c))
        return [m for m in found if m is not None]

    def manifests(self, kind: Kind) -> list[Manifest]:
        """Manifests of this job's valid, unexpired checkpoints of one kind, in `names`
        order."""
        now = time.time()
        live = [m for m in self._manifests(kind) if not m.expired(now)]
        return sorted(live, key=lambda m: _natural_key(m.name))

    def files(self, kind: Kind, name: str) -> dict[str, Path]:
        """A valid checkpoint's files (its manifest left out), keyed by their path
        relative to the checkpoint folder.

        Raises:
            FileNotFoundError: No valid checkpoint has that name.
        """
        directory, _manifest = self.resolve(kind, name)
        return {
            str(p.relative_to(directory)): p
            for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME
        }

    def delete(self, kind: Kind, name: str) -> None:
        """Delete one of this job's checkpoints.

        Raises:
            FileNotFoundError: No valid checkpoint has that name.
        """
        directory, _manifest = self.resolve(kind, name)
        with self._lock:
            trash = self._job_dir / ".tmp" / f"old-del-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            # The manifest goes first, so that an interrupted delete never leaves a
            # checkpoint that lists as valid but lacks files (nor one restored at start).
            (directory / MANIFEST_NAME).unlink()
            os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def update(self, kind: Kind, name: str, **changes: Any) -> Manifest:
        """Change a committed checkpoint's manifest (``expires_at``, ``metadata``).

        Raises:
            FileNotFoundError: No valid checkpoint has that name.
        """
        directory, manifest = self.resolve(kind, name)
        updated = attrs.evolve(manifest, **changes)
        tmp = directory / f".{MANIFEST_NAME}.{uuid.uuid4().hex}"
        _write_json(tmp, attrs.asdict(updated))
        with self._lock:
            os.replace(tmp, directory / MANIFEST_NAME)
        return updated


def _valid(child: Path) -> bool:
    try:
        validate_name(child.name)
    except ValueError:
        return False
    return (child / MANIFEST_NAME).is_file()


def _natural_key(name: str) -> list[Any]:
    parts: list[Any] = []
    digits = ""
    text = ""
    for ch in name:
        if ch.isdigit():
            if text:
                parts.append((1, text))
                text = ""
            digits += ch
        else:
            if digits:
                parts.append((0, int(digits)))
                digits = ""
            text += ch
    if digits:
        parts.append((0, int(digits)))
    if text:
        parts.append((1, text))
    return parts


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, and every folder's entries."""
    for directory, _subdirs, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def _fsync(path: Path | str) -> None:
    """Flush a file, or a folder's entries (new names, renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
