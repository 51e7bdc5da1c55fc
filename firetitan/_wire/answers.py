"""Decoders of the answers that no tinker response type describes.

Each takes the parsed answer (or, for forward results, the bytes of a protobuf answer)
and raises `WireError` when it does not fit; the endpoint table names them as the
result codecs of their endpoints.
"""

from __future__ import annotations

from typing import Any

import tinker

from firetitan._wire._json import WireError
from firetitan._wire.proto import decode_forward_backward_output_proto
from firetitan._wire.results import decode_forward_backward_output

__all__ = [
    "decode_account_names",
    "decode_checkpoint_names",
    "decode_created_model",
    "decode_forward_result",
]


def decode_created_model(obj: Any) -> dict[str, Any]:
    """The answer of a created (or loaded-into-being) model: its ``model_id`` and the
    trainer's other facts about it (``comms``, ``supports_*`` flags, ...).

    Raises:
        WireError: No string ``model_id``.
    """
    model_id = obj.get("model_id") if isinstance(obj, dict) else None
    if not isinstance(model_id, str) or not model_id:
        raise WireError("model_id", "the model was created without a string model_id")
    return dict(obj)


def decode_forward_result(obj: Any) -> tinker.ForwardBackwardOutput:
    """A forward or forward_backward result, from JSON or from protobuf bytes (§4.7).

    Raises:
        WireError: A malformed result.
    """
    if isinstance(obj, bytes):
        return decode_forward_backward_output_proto(obj)
    return decode_forward_backward_output(obj)


def decode_checkpoint_names(obj: Any) -> list[str]:
    """The names in a ``list_checkpoints`` answer.

    Raises:
        WireError: No ``checkpoints`` list of strings.
    """
    names = obj.get("checkpoints") if isinstance(obj, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WireError("checkpoints", "expected a list of strings")
    return list(names)


def decode_account_names(obj: Any) -> list[str]:
    """The account names a control plane's account listing gives (entries without a
    string name are left out; a missing list is no accounts)."""
    accounts = obj.get("accounts") if isinstance(obj, dict) else None
    if not isinstance(accounts, list):
        return []
    return [a["name"] for a in accounts if isinstance(a, dict) and isinstance(a.get("name"), str)]
