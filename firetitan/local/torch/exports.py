"""Sampler exports (``save_weights_for_sampler``) and their reconstruction.

Every export folder holds ``firetitan-export.json`` (`EXPORT_FILE`) and one of:

* ``base``, full-parameter (``format: "hf"``): ``config.json`` + ``model.safetensors``,
  a Hugging Face checkpoint that ``from_pretrained`` loads as is;
* ``base``, LoRA (``format: "peft"``): ``adapter_config.json`` +
  ``adapter_model.safetensors`` with PEFT key names (``base_model.model.<module>.lora_A.weight``);
* ``delta`` (either format): ``delta.safetensors`` in the Fireworks hot-load delta
  format (``compression_format: "arc_v2"``, ``checksum_format: "alder32"``), written and
  read with the fireworks-delta-compression library: per tensor, the bytewise XOR of the
  new tensor and the previous export's reconstructed tensor, zstd-compressed, with the
  Adler-32 checksum of the new tensor in the file's safetensors metadata. The config
  file sits next to it; the export metadata names the previous export (a sibling
  folder) and its digest.

XOR is exact and self-inverse, and unchanged bytes are zero, so a delta between nearby
weights compresses well. The checksum makes applying a delta onto the wrong base fail
instead of producing other weights; an inference deployment applies the same files with
the same library (`firetitan.local.deployment`).

The metadata also records ``digest``, the SHA-256 of the reconstructed tensors
(`firetitan.local.torch.models.tensor_digest`): `rebuild_snapshot` checks every link of
a delta chain against it, so a missing, replaced or corrupted export is reported, never
silently merged. All files are safetensors or JSON; nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fireworks_delta_compression import (
    delta_compress_dicts_to_file,
    delta_decompress_dict_from_file,
)
from safetensors.torch import load_file, save_file

from firetitan._checkpoint_paths import validate_name
from firetitan.local.torch.models import tensor_digest

__all__ = [
    "CHECKSUM_FORMAT",
    "COMPRESSION_FORMAT",
    "EXPORT_FILE",
    "ExportMeta",
    "apply_delta",
    "config_file",
    "export_chain",
    "load_base_export",
    "materialize_snapshot",
    "read_export_meta",
    "rebuild_snapshot",
    "write_export",
]

EXPORT_FILE = "firetitan-export.json"
FORMAT_VERSION = 1
_WEIGHTS_FILE = {"hf": "model.safetensors", "peft": "adapter_model.safetensors"}
_CONFIG_FILE = {"hf": "config.json", "peft": "adapter_config.json"}
_DELTA_FILE = "delta.safetensors"
#: The hot-load delta format of delta exports, as ``incremental_snapshot_metadata`` names it.
COMPRESSION_FORMAT = "arc_v2"
#: Its per-tensor checksum (spelled as the Fireworks SDK spells it).
CHECKSUM_FORMAT = "alder32"
#: A chain longer than this is treated as a cycle or a corrupt store.
_MAX_CHAIN = 100_000

ExportMeta = dict[str, Any]


def write_export(
    directory: Path,
    *,
    fmt: str,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    checkpoint_type: str,
    previous: tuple[Path, Mapping[str, torch.Tensor]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ExportMeta:
    """Write one export into the empty ``directory``.

    Args:
        directory: Target folder.
        fmt: ``"hf"`` or ``"peft"``.
        tensors: The full tensors of this snapshot (CPU, contiguous).
        config: The JSON of ``config.json`` / ``adapter_config.json``.
        checkpoint_type: ``"base"`` or ``"delta"`` (merged exports are written as base).
        previous: For ``delta``: the previous export's folder and its reconstructed tensors.
        extra: More metadata to record (base model, LoRA rank, ...).

    Returns:
        The metadata written to `EXPORT_FILE`.

    Raises:
        ValueError: ``delta`` without a previous export, or a previous export whose
            tensors do not line up with these (names, shapes or dtypes).
    """
    digest = tensor_digest(tensors)
    meta: ExportMeta = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "checkpoint_type": checkpoint_type,
        "digest": digest,
        "previous": None,
        "previous_digest": None,
        **(extra or {}),
    }
    (directory / _CONFIG_FILE[fmt]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if checkpoint_type == "delta":
        if previous is None:
            raise ValueError("a delta export needs the previous export to diff against")
        prev_dir, prev = previous
        _check_aligned(tensors, prev, prev_dir.name)
        delta_compress_dicts_to_file(
            src={n: prev[n].contiguous() for n in tensors},
            dst={n: t.cpu().contiguous() for n, t in tensors.items()},
            diff_file=str(directory / _DELTA_FILE),
            compression_format=COMPRESSION_FORMAT,
        )
        meta["compression_format"] = COMPRESSION_FORMAT
        meta["checksum_format"] = CHECKSUM_FORMAT
        meta["previous"] = prev_dir.name
        meta["previous_digest"] = tensor_digest(prev)
    else:
        save_file(dict(tensors), str(directory / _WEIGHTS_FILE[fmt]), metadata={"format": "pt"})
    (directory / EXPORT_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _check_aligned(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], old_name: str
) -> None:
    if set(new) != set(old):
        diff = sorted(set(new) ^ set(old))[:3]
        raise ValueError(f"previous export {old_name!r} has other tensors (e.g. {diff})")
    for n, t in new.items():
        o = old[n]
        if t.shape != o.shape or t.dtype != o.dtype:
            raise ValueError(
                f"previous export {old_name!r}: tensor {n!r} is {o.dtype}{list(o.shape)} "
                f"there and {t.dtype}{list(t.shape)} here"
            )


def read_export_meta(export_dir: Path) -> ExportMeta:
    """The metadata of an export.

    Raises:
        ValueError: The folder holds no readable export metadata.
    """
    try:
        meta = json.loads((export_dir / EXPORT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{export_dir} is not a sampler export (no readable {EXPORT_FILE})"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") not in _WEIGHTS_FILE:
        raise ValueError(f"{export_dir} has an unknown export format")
    return meta


def export_chain(export_dir: Path | str) -> list[tuple[Path, ExportMeta]]:
    """An export and the exports it builds on, newest first, ending at a base export.

    Raises:
        ValueError: A missing or unreadable export, or a cycle.
    """
    export_dir = Path(export_dir)
    chain: list[tuple[Path, ExportMeta]] = []
    seen: set[Path] = set()
    current = export_dir
    while True:
        resolved = current.resolve()
        if resolved in seen or len(chain) > _MAX_CHAIN:
            raise ValueError(f"the delta chain of {export_dir} loops at {current.name!r}")
        seen.add(resolved)
        meta = read_export_meta(current)
        chain.append((current, meta))
        if meta.get("checkpoint_type") != "delta":
            return chain
        prev_name = validate_name(meta.get("previous"), "previous export name")
        current = current.parent / prev_name


def load_base_export(export_dir: Path, meta: ExportMeta) -> dict[str, torch.Tensor]:
    """The tensors of a base export, checked against its recorded digest.

    Raises:
        ValueError: Unreadable weights, or weights other than the ones recorded.
    """
    try:
        tensors = load_file(str(export_dir / _WEIGHTS_FILE[meta["format"]]))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"export {export_dir.name!r} has unreadable weights: {exc}") from exc
    _verify(export_dir, meta, tensors)
    return tensors


def apply_delta(
    previous: Mapping[str, torch.Tensor], export_dir: Path, meta: ExportMeta
) -> dict[str, torch.Tensor]:
    """The tensors of the delta export ``export_dir``, applied onto ``previous`` (the
    tensors of the export it names), verified by checksum and digest.

    Raises:
        ValueError: The delta does not apply: other tensors, another compression format,
            a checksum mismatch (``previous`` is not its base, or the file is corrupt),
            or a result other than the recorded digest.
    """
    fmt = meta.get("compression_format", COMPRESSION_FORMAT)
    if fmt != COMPRESSION_FORMAT:
        raise ValueError(f"export {export_dir.name!r} uses compression {fmt!r}")
    try:
        with warnings.catch_warnings():
            # The library wraps zstd's read-only output in a tensor that it only reads
            # (XOR into a new tensor); torch warns about the buffer regardless.
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            tensors: dict[str, torch.Tensor] = delta_decompress_dict_from_file(
                src=dict(previous),
                diff_file=str(export_dir / _DELTA_FILE),
                compression_format=COMPRESSION_FORMAT,
            )
    except (OSError, ValueError, RuntimeError) as exc:
        cause = exc.__cause__ or exc
        raise ValueError(
            f"delta export {export_dir.name!r} does not apply onto {meta.get('previous')!r}: "
            f"{exc}" + (f" ({cause})" if cause is not exc else "")
        ) from exc
    _verify(export_dir, meta, tensors)
    return tensors


def rebuild_snapshot(export_dir: Path | str) -> dict[str, torch.Tensor]:
    """The full tensors of any export, bit-exact, following its chain of deltas.

    For a ``hf`` export these are the model's tensors under Hugging Face names; for a
    ``peft`` export, the adapter tensors under PEFT names.

    Raises:
        ValueError: The chain is broken: a missing or unreadable export, a previous
            export that was replaced (digest mismatch), a corrupted delta (checksum
            mismatch), a cycle, or mixed formats.
    """
    chain = export_chain(export_dir)
    base_dir, base_meta = chain[-1]
    fmt = base_meta["format"]
    tensors = load_base_export(base_dir, base_meta)
    for link_dir, meta in reversed(chain[:-1]):
        if meta["format"] != fmt:
            raise ValueError(f"export {link_dir.name!r} is {meta['format']}; its base is {fmt}")
        if meta.get("previous_digest") != base_meta.get("digest"):
            raise ValueError(
                f"export {link_dir.name!r} was diffed against another version of "
                f"{meta.get('previous')!r} than the one on disk"
            )
        tensors = apply_delta(tensors, link_dir, meta)
        base_meta = meta
    return tensors


def _verify(directory: Path, meta: ExportMeta, tensors: Mapping[str, torch.Tensor]) -> None:
    if meta.get("digest") != tensor_digest(tensors):
        raise ValueError(f"export {directory.name!r} does not rebuild to its recorded digest")


def materialize_snapshot(export_dir: Path | str, out_dir: Path | str) -> Path:
    """Write any export as a standalone folder: a Hugging Face checkpoint for ``hf``
    exports, a PEFT adapter for ``peft`` ones.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: The export cannot be rebuilt (see `rebuild_snapshot`).
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    meta = read_export_meta(export_dir)
    fmt = meta["format"]
    tensors = rebuild_snapshot(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(export_dir / _CONFIG_FILE[fmt], out_dir / _CONFIG_FILE[fmt])
    save_file(tensors, str(out_dir / _WEIGHTS_FILE[fmt]), metadata={"format": "pt"})
    return out_dir


def config_file(export_dir: Path, meta: ExportMeta) -> Path:
    """The ``config.json`` or ``adapter_config.json`` of an export."""
    return export_dir / _CONFIG_FILE[meta["format"]]
