"""Which weights a deployment serves: its base model, and hot-loaded sampler snapshots.

A snapshot identity names a sampler export under the checkpoint root that
``firetitan serve --checkpoint-dir DIR`` writes (``DIR/<job>/sampler/<name>/``): a bare
name (looked up in every job; it must be unique), ``cross_job://<job>/<name>`` or
``tinker://<job>/sampler_weights/<name>``.

Loading follows the export's own metadata, never the client's belief about it:

* a ``base`` export loads whole, checked against its recorded digest;
* a ``delta`` export applies (fireworks-delta-compression ``arc_v2``, Adler-32 per
  tensor) onto the snapshot it names. The hot-load must name that same snapshot as
  ``previous_snapshot_identity``; its tensors come from the snapshot being served when
  that is the one, else they are rebuilt from disk. A delta hot-loaded without metadata,
  naming another base, or whose checksum fails is refused.

Every refusal is a `SnapshotError` whose message says what was wrong; the server turns
it into stage ``error`` for that identity.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs
import torch
from torch import nn

from firetitan._checkpoint_paths import parse_checkpoint_path
from firetitan.local.checkpoints import MANIFEST_NAME, Manifest
from firetitan.local.tinker import compat as tinker_compat
from firetitan.local.torch import exports
from firetitan.local.torch.models import (
    build_standin,
    load_pretrained,
    tensor_digest,
    unique_state,
)
from firetitan.local.torch.snapshots import module_from_export
from firetitan.local.torch.tokenizer import ByteTokenizer, Tokenizer, load_hf_tokenizer

__all__ = ["Snapshot", "SnapshotError", "SnapshotLoader"]


class SnapshotError(Exception):
    """A snapshot cannot be served; the message says why."""


@attrs.frozen(eq=False)
class Snapshot:
    """Weights a deployment can serve.

    Attributes:
        identity: The hot-loaded identity; None for the deployment's base model.
        module: The frozen model.
        export_dir: The export it was loaded from (None for the base model).
        digest: The export's recorded digest (of ``tensors``).
        tensors: The export's full tensors, the base of a following delta.
    """

    identity: str | None
    module: nn.Module
    export_dir: Path | None = None
    digest: str | None = None
    tensors: dict[str, torch.Tensor] | None = None


class SnapshotLoader:
    """Builds the base model and loads snapshots from the checkpoint root.

    Args:
        root: The checkpoint root shared with the trainer.
        base_model: The base model this deployment serves.
        size: Stand-in preset (as the trainer's ``--size``).
        weights: A Hugging Face folder of real weights (as the trainer's ``--weights``).
        device: Where the models run.
        seed: The stand-in seed (the trainer's ``--seed``; 0 by default on both).
    """

    def __init__(
        self,
        root: Path,
        base_model: str,
        *,
        size: str = "tiny",
        weights: Path | None = None,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.base_model = base_model
        self.device = device
        if weights is not None:
            module = load_pretrained(Path(weights))
            self.tokenizer: Tokenizer = load_hf_tokenizer(Path(weights)) or ByteTokenizer()
        else:
            module = build_standin(base_model, size, seed)
            self.tokenizer = ByteTokenizer()
        self.base = Snapshot(identity=None, module=module.to(device))
        self._base_digest: str | None = None

    def _base_lookup(self, name: str) -> tuple[nn.Module, str]:
        if name != self.base_model:
            raise ValueError(f"it adapts {name!r}; this deployment serves {self.base_model!r}")
        if self._base_digest is None:
            self._base_digest = tensor_digest(unique_state(self.base.module))
        return self.base.module, self._base_digest

    def find(self, identity: str) -> Path:
        """The export folder an identity names.

        Raises:
            SnapshotError: A malformed identity, none or several exports of that name.
        """
        try:
            if tinker_compat.is_tinker_path(identity):
                parsed = tinker_compat.parse_tinker_path(identity)
                if parsed.kind != "sampler":
                    raise ValueError(f"{identity!r} names training state, not a sampler export")
                jobs, name = [parsed.job_id], parsed.name
            else:
                ref = parse_checkpoint_path(identity)
                name = ref.name
                jobs = (
                    [ref.job_id]
                    if ref.job_id
                    else sorted(p.name for p in self.root.iterdir() if p.is_dir())
                )
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"identity {identity!r}: {exc}") from None
        found = [self.root / job / "sampler" / name for job in jobs]
        found = [d for d in found if _committed(d)]
        if not found:
            raise SnapshotError(
                f"no sampler snapshot {identity!r} under the checkpoint root {self.root}"
            )
        if len(found) > 1:
            owners = ", ".join(d.parent.parent.name for d in found)
            raise SnapshotError(
                f"snapshot name {name!r} exists in several jobs ({owners}); "
                "hot-load it as cross_job://<job>/<name>"
            )
        return found[0]

    def load(self, identity: str, previous_identity: str | None, current: Snapshot) -> Snapshot:
        """Load the snapshot ``identity`` while ``current`` is served.

        Args:
            identity: What to load.
            previous_identity: ``incremental_snapshot_metadata.previous_snapshot_identity``
                of the hot-load, None when it carried no metadata.
            current: The snapshot being served.

        Raises:
            SnapshotError: What is wrong (see the module docstring).
        """
        export_dir = self.find(identity)
        try:
            meta = exports.read_export_meta(export_dir)
            owner = meta.get("base_model")
            if owner is not None and owner != self.base_model:
                raise ValueError(
                    f"it is a snapshot of {owner!r}; this deployment serves {self.base_model!r}"
                )
            if meta.get("checkpoint_type") == "delta":
                tensors = self._apply(identity, export_dir, meta, previous_identity, current)
            else:
                tensors = exports.load_base_export(export_dir, meta)
            module = module_from_export(
                export_dir, meta, tensors, base=self._base_lookup, device=self.device
            )
        except SnapshotError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"snapshot {identity!r} cannot be loaded: {exc}") from None
        return Snapshot(
            identity=identity,
            module=module,
            export_dir=export_dir,
            digest=meta.get("digest"),
            tensors=tensors,
        )

    def _apply(
        self,
        identity: str,
        export_dir: Path,
        meta: exports.ExportMeta,
        previous_identity: str | None,
        current: Snapshot,
    ) -> dict[str, torch.Tensor]:
        named = str(meta.get("previous"))
        if previous_identity is None:
            raise SnapshotError(
                f"snapshot {identity!r} is a delta onto {named!r}; a hot-load of it needs "
                "incremental_snapshot_metadata naming that base (loading it as a full "
                "snapshot would serve wrong weights)"
            )
        previous_dir = export_dir.parent / named
        if self.find(previous_identity).resolve() != previous_dir.resolve():
            raise SnapshotError(
                f"snapshot {identity!r} is a delta onto {named!r}, but the hot-load names "
                f"{previous_identity!r} as its base"
            )
        if (
            current.export_dir is not None
            and current.tensors is not None
            and current.export_dir.resolve() == previous_dir.resolve()
            and current.digest == meta.get("previous_digest")
        ):
            base = current.tensors
        else:  # not the snapshot being served: rebuild its chain from disk
            base = exports.rebuild_snapshot(previous_dir)
            if tensor_digest(base) != meta.get("previous_digest"):
                raise ValueError(f"its base {named!r} was replaced since it was diffed")
        return exports.apply_delta(base, export_dir, meta)


def _committed(export_dir: Path) -> bool:
    """Whether a sampler checkpoint folder is committed and unexpired."""
    try:
        manifest = Manifest(**json.loads((export_dir / MANIFEST_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return not manifest.expired(time.time())
