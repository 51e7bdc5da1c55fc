"""``save_weights_external``: weights exported for download (tinker 0.38).

tinker's ``TrainingClient.save_weights_external`` posts ``model_id``, ``seq_id``,
``path``, ``ttl_seconds`` and ``age_encryption_recipients``, and expects
``tinker://<run>/external_weights/<name>``. The export is what a sampler export of the
model holds (full weights in Hugging Face layout, or a PEFT adapter for a LoRA model),
stored as the checkpoint kind ``external``; `firetitan.local.rest` lists it,
signs download URLs for its files and serves them.

With recipients, every file is encrypted with age (``pyrage``) to all of them and stored
with a ``.age`` suffix, the plaintext never kept: tinker-cookbook's ``weights.download``
of a training checkpoint exports this way to a key it generates, then decrypts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from firetitan._wire import WireError
from firetitan.local.engine import UserError

__all__ = ["AGE_SUFFIX", "ExternalRequest", "decode_external_request", "encrypt_files"]

AGE_SUFFIX: Final = ".age"
_KEYS: Final = frozenset(
    {"model_id", "seq_id", "path", "ttl_seconds", "age_encryption_recipients", "type"}
)


@attrs.frozen(kw_only=True)
class ExternalRequest:
    """A decoded ``save_weights_external`` body."""

    model_id: str
    seq_id: int
    path: str
    ttl_seconds: int | None = None
    recipients: tuple[str, ...] = ()


def decode_external_request(obj: Mapping[str, Any]) -> ExternalRequest:
    """Check and read a ``save_weights_external`` body.

    Raises:
        WireError: A missing or mistyped field, or an unknown key (named).
    """
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise WireError(unknown[0], "is not a field of save_weights_external")
    model_id, seq_id, path = obj.get("model_id"), obj.get("seq_id"), obj.get("path")
    if not isinstance(model_id, str) or not model_id:
        raise WireError("model_id", "must be a non-empty string")
    if type(seq_id) is not int:
        raise WireError("seq_id", "must be an integer")
    if not isinstance(path, str) or not path:
        raise WireError("path", "must be a non-empty string")
    ttl = obj.get("ttl_seconds")
    if ttl is not None and (type(ttl) is not int or ttl <= 0):
        raise WireError("ttl_seconds", "must be a positive integer")
    recipients = obj.get("age_encryption_recipients") or []
    if not isinstance(recipients, list) or not all(isinstance(r, str) and r for r in recipients):
        raise WireError("age_encryption_recipients", "must be a list of age recipient strings")
    return ExternalRequest(
        model_id=model_id, seq_id=seq_id, path=path, ttl_seconds=ttl, recipients=tuple(recipients)
    )


def encrypt_files(directory: Path, recipients: tuple[str, ...]) -> None:
    """Replace every file under ``directory`` by its age encryption to ``recipients``
    (``<file>.age``).

    Raises:
        UserError: A recipient is neither an ``age1...`` key nor an SSH public key, or
            ``pyrage`` is not installed.
    """
    try:
        import pyrage  # type: ignore[import-untyped]  # no stubs ship with it
    except ImportError:
        raise UserError(
            "age_encryption_recipients needs the pyrage package on the trainer"
        ) from None
    parsed: list[Any] = []
    for recipient in recipients:
        module = pyrage.ssh if recipient.startswith("ssh-") else pyrage.x25519
        try:
            parsed.append(module.Recipient.from_str(recipient))
        except pyrage.RecipientError as exc:
            raise UserError(
                f"age_encryption_recipients: {recipient!r} is not valid: {exc}"
            ) from None
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        pyrage.encrypt_file(str(path), str(path) + AGE_SUFFIX, parsed)
        path.unlink()
