"""``save_state`` / ``load_state`` checkpoints, written with ``torch.distributed.checkpoint``.

Format choice. DCP's default ``FileSystemWriter`` stores its metadata (``.metadata``) as
a pickle, and ``FileSystemReader.read_metadata`` reads it back with ``pickle.load``;
that violates the trainer's "never unpickle" rule. DCP also ships a Hugging Face
storage layer (``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``): tensors go
to ``model-00001-of-00001.safetensors`` and the index to JSON
(``model.safetensors.index.json``), and the reader rebuilds DCP's metadata from the
safetensors headers. Loading therefore parses only safetensors and JSON. We save and
load through that pair, single process (``no_dist=True``, no process group).

What a checkpoint holds, as one flat DCP state dict of tensors:

* ``weights/<name>``: every trainable parameter (all of them for full-parameter
  models, the adapter matrices for LoRA; frozen base weights are not repeated, and
  ``state.json`` records their digest instead);
* ``grads/<name>``: the gradient accumulated since the last ``optim_step``;
* ``adam/exp_avg/<name>``, ``adam/exp_avg_sq/<name>``, ``adam/step``;
* ``window``: the accumulation counters (loss tokens, sequences);
* ``rng/sample``: the model's sampling generator state;

plus ``firetitan-state.json``: format version, architecture, LoRA settings, base digest
and the list of parameters with shapes and dtypes, which `load_state` checks against
the model before reading any tensor, so that a mismatch is a clear `UserError`.

Restoring is all-or-nothing: tensors are read into fresh buffers and copied into the
model only once the whole read succeeded.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch

from firetitan.local.engine import UserError
from firetitan.local.torch.optim import AdamW, Window

__all__ = ["STATE_FILE", "StateDescription", "TrainingState", "load_state", "save_state"]

STATE_FILE = "firetitan-state.json"
FORMAT = "firetitan-torch-state"
VERSION = 1

#: What a model looks like, as recorded in and compared against a checkpoint.
StateDescription = dict[str, Any]


@contextmanager
def _single_process() -> Iterator[None]:
    # DCP warns on every call that it assumes a single process: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@attrs.frozen(kw_only=True)
class TrainingState:
    """The live parts of one model that a checkpoint saves and restores.

    Attributes:
        description: What the model looks like (`StateDescription`).
        optimizer: Its AdamW, which holds the trainable parameters and moments.
        window: Its accumulation counters.
        sample_rng: Its sampling generator.
    """

    description: StateDescription
    optimizer: AdamW
    window: Window
    sample_rng: torch.Generator


def save_state(directory: Path, training: TrainingState) -> None:
    """Write the model's training state into the empty ``directory``."""
    optimizer, window, sample_rng = training.optimizer, training.window, training.sample_rng
    tensors: dict[str, torch.Tensor] = {}
    for name, p in optimizer.params.items():
        tensors[f"weights/{name}"] = _cpu(p)
        tensors[f"grads/{name}"] = _cpu(p.grad if p.grad is not None else torch.zeros_like(p))
        tensors[f"adam/exp_avg/{name}"] = _cpu(optimizer.exp_avg[name])
        tensors[f"adam/exp_avg_sq/{name}"] = _cpu(optimizer.exp_avg_sq[name])
    tensors["adam/step"] = torch.tensor([optimizer.step], dtype=torch.int64)
    tensors["window"] = torch.tensor([window.loss_tokens, window.sequences], dtype=torch.int64)
    tensors["rng/sample"] = sample_rng.get_state().clone()
    # Imported here: torch.distributed.checkpoint takes seconds to import, and only
    # checkpointing needs it.
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    with _single_process():
        dcp_save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory)), no_dist=True)
    for path in sorted(directory.glob("*.safetensors")):
        _canonical_header(path)
    meta = {"format": FORMAT, "version": VERSION, **training.description}
    (directory / STATE_FILE).write_text(json.dumps(meta, sort_keys=True, indent=1))


def load_state(directory: Path, training: TrainingState, *, with_optimizer: bool) -> None:
    """Restore a `save_state` checkpoint into the model.

    Without ``with_optimizer``, only the weights are restored; moments, step count,
    accumulated gradient and counters start fresh (zero).

    Raises:
        UserError: ``directory`` holds no state checkpoint of this format, or one that
            does not fit the model (architecture, LoRA settings, base weights,
            parameter names or shapes); the message says what differs.
    """
    optimizer, window, sample_rng = training.optimizer, training.window, training.sample_rng
    _check_compatible(directory, training.description)
    names = list(optimizer.params)
    target: dict[str, torch.Tensor] = {
        f"weights/{n}": torch.empty_like(_cpu(p)) for n, p in optimizer.params.items()
    }
    if with_optimizer:
        for n, p in optimizer.params.items():
            for prefix in ("grads", "adam/exp_avg", "adam/exp_avg_sq"):
                target[f"{prefix}/{n}"] = torch.empty(p.shape, dtype=torch.float32)
        target["adam/step"] = torch.zeros(1, dtype=torch.int64)
        target["window"] = torch.zeros(2, dtype=torch.int64)
        target["rng/sample"] = torch.empty_like(sample_rng.get_state())
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    try:
        with _single_process():
            dcp_load(target, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=True)
    except Exception as exc:  # a checked description with unreadable tensors
        raise UserError(f"state checkpoint {directory.name!r} cannot be read: {exc}") from exc

    # Everything was read: now mutate the model.
    with torch.no_grad():
        for n in names:
            p = optimizer.params[n]
            p.copy_(target[f"weights/{n}"])
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if with_optimizer:
                p.grad.copy_(target[f"grads/{n}"])
                optimizer.exp_avg[n].copy_(target[f"adam/exp_avg/{n}"])
                optimizer.exp_avg_sq[n].copy_(target[f"adam/exp_avg_sq/{n}"])
            else:
                p.grad.zero_()
                optimizer.exp_avg[n].zero_()
                optimizer.exp_avg_sq[n].zero_()
    if with_optimizer:
        optimizer.step = int(target["adam/step"][0])
        window.loss_tokens, window.sequences = (int(v) for v in target["window"].tolist())
        sample_rng.set_state(target["rng/sample"])
    else:
        optimizer.step = 0
        window.reset()


def read_description(directory: Path) -> dict[str, Any]:
    """The ``firetitan-state.json`` of a checkpoint.

    Raises:
        UserError: It is missing, unreadable or of another format.
    """
    try:
        meta = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{directory.name!r} is not a state checkpoint of this trainer ({STATE_FILE} "
            "is missing or unreadable)"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{directory.name!r} has an unknown state format")
    return meta


def _check_compatible(directory: Path, model: StateDescription) -> None:
    saved = read_description(directory)
    what = f"state checkpoint {directory.name!r}"
    s_lora, m_lora = saved.get("lora"), model.get("lora")
    if (s_lora is None) != (m_lora is None):
        s_kind = "full-parameter" if s_lora is None else f"LoRA rank {s_lora['rank']}"
        m_kind = "full-parameter" if m_lora is None else f"LoRA rank {m_lora['rank']}"
        raise UserError(f"{what} holds a {s_kind} model; this model is {m_kind}")
    if s_lora is not None and m_lora is not None and s_lora != m_lora:
        raise UserError(f"{what} has LoRA settings {s_lora}; this model has {m_lora}")
    if saved.get("architecture") != model.get("architecture"):
        raise UserError(
            f"{what} comes from architecture {saved.get('architecture')}; this model is "
            f"{model.get('architecture')}"
        )
    if m_lora is not None and saved.get("base_digest") != model.get("base_digest"):
        raise UserError(
            f"{what} was trained on other base weights ({saved.get('base_model')!r}); "
            f"this model's base is {model.get('base_model')!r}"
        )
    s_params: Mapping[str, Any] = saved.get("params", {})
    m_params: Mapping[str, Any] = model["params"]
    missing = sorted(set(m_params) - set(s_params))
    extra = sorted(set(s_params) - set(m_params))
    if missing or extra:
        raise UserError(
            f"{what} does not match this model's parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, spec in m_params.items():
        if s_params[name] != spec:
            raise UserError(f"{what}: parameter {name!r} is {s_params[name]} there and {spec} here")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _canonical_header(path: Path) -> None:
    """Sort the ``__metadata__`` entries of a safetensors header in place.

    safetensors serialises that map from a hash map, whose order varies between
    writes; sorting makes identical states give byte-identical files. The rewritten
    header has the same length (same entries, same compact JSON), so only the header
    bytes change; if the length would differ the file is left as it is.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        body += b" " * (length - len(body))
        if len(body) != length:
            return
        f.seek(8)
        f.write(body)
