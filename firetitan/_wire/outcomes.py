"""Future-returning calls (§4): the submission acknowledgement (`FutureAck`) and the
four outcomes of a ``retrieve_future`` poll (`TryAgain`, `CompleteMetadata`,
`FutureFailed`, `FutureResult`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs

from firetitan._wire._json import (
    JSON,
    WireError,
    _int,
    _list,
    _obj,
    _opt_str,
    _present,
    _required,
    _str,
)

__all__ = [
    "CompleteMetadata",
    "FutureAck",
    "FutureFailed",
    "FutureOutcome",
    "FutureResult",
    "TryAgain",
    "decode_future_ack",
    "decode_future_outcome",
    "encode_future_ack",
    "encode_future_outcome",
]

_MAX_ERROR_CLASS_BYTES: Final = 128

_ERROR_CATEGORIES: Final = ("user", "server", "unknown")


# --------------------------------------------------------------------------- acknowledgements


@attrs.frozen(kw_only=True)
class FutureAck:
    """The answer to a future-returning POST (§4.1).

    ``sample_sequence_ids`` (one per requested sample) is required by tinker 0.38 on
    ``asample`` acknowledgements: tinker stamps them onto the returned sequences.
    """

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: Sequence[str] | None = None


def encode_future_ack(ack: FutureAck) -> JSON:
    """Encode a submission acknowledgement."""
    return _present(ack, "request_id", "model_id", "sample_sequence_ids")


def decode_future_ack(obj: Any) -> FutureAck:
    """Decode a submission acknowledgement.

    Raises:
        WireError: No string ``request_id``, or malformed optional fields.
    """
    body = _obj(obj, "")
    ids_raw = body.get("sample_sequence_ids")
    ids = None
    if ids_raw is not None:
        ids = [
            _str(s, f"sample_sequence_ids[{i}]")
            for i, s in enumerate(_list(ids_raw, "sample_sequence_ids"))
        ]
    return FutureAck(
        request_id=_str(_required(body, "request_id", ""), "request_id"),
        model_id=_opt_str(body, "model_id", ""),
        sample_sequence_ids=ids,
    )


# --------------------------------------------------------------------------- futures


@attrs.frozen
class TryAgain:
    """Still pending (§4.3, outcome 1).

    Attributes:
        request_id: The pending request.
        queue_state: ``active``, or why nothing runs (``paused_capacity``,
            ``paused_rate_limit``); None when the trainer did not say.
        queue_state_reason: The trainer's words for that state (tinker's
            ``queue_state_reason``), or None.
    """

    request_id: str
    queue_state: str | None = "active"
    queue_state_reason: str | None = None


@attrs.frozen
class CompleteMetadata:
    """Ready but large; re-poll with ``allow_metadata_only=False`` (outcome 2)."""

    response_payload_size: int


@attrs.frozen
class FutureFailed:
    """Failed on the trainer (outcome 3). ``category`` is user, server or unknown."""

    error: str
    category: str = "unknown"
    error_class: str | None = None


@attrs.frozen
class FutureResult:
    """The success payload (outcome 4), still as JSON."""

    payload: Any


FutureOutcome = TryAgain | CompleteMetadata | FutureFailed | FutureResult


def encode_future_outcome(outcome: FutureOutcome) -> JSON:
    """Encode a ``retrieve_future`` answer.

    Raises:
        WireError: A success payload that is not an object or that the client would
            misread as another outcome (an ``"error"`` key, ``"type": "try_again"``,
            ``"status": "complete_metadata"``).
    """
    if isinstance(outcome, TryAgain):
        body: JSON = {"type": "try_again", "request_id": outcome.request_id}
        if outcome.queue_state is not None:
            body["queue_state"] = outcome.queue_state
        if outcome.queue_state_reason is not None:
            body["queue_state_reason"] = outcome.queue_state_reason
        return body
    if isinstance(outcome, CompleteMetadata):
        return {
            "status": "complete_metadata",
            "response_payload_size": outcome.response_payload_size,
        }
    if isinstance(outcome, FutureFailed):
        category = outcome.category if outcome.category in _ERROR_CATEGORIES else "unknown"
        body = {"error": outcome.error, "category": category}
        if outcome.error_class is not None:
            body["error_class"] = outcome.error_class
        return body
    payload = _obj(outcome.payload, "")
    if "error" in payload:
        raise WireError("error", "a success payload must not have an 'error' key")
    if payload.get("type") == "try_again" or payload.get("status") == "complete_metadata":
        raise WireError("", "a success payload must not look like a pending answer")
    return payload


def decode_future_outcome(obj: Any) -> FutureOutcome:
    """Classify a ``retrieve_future`` answer in the reference client's order (§4.3).

    Raises:
        WireError: The body is not a JSON object.
    """
    body = _obj(obj, "")
    if body.get("type") == "try_again":
        request_id = body.get("request_id")
        queue_state = body.get("queue_state")
        reason = body.get("queue_state_reason")
        return TryAgain(
            request_id if isinstance(request_id, str) else "",
            queue_state if isinstance(queue_state, str) else None,
            reason if isinstance(reason, str) else None,
        )
    if body.get("status") == "complete_metadata":
        size = body.get("response_payload_size")
        return CompleteMetadata(0 if size is None else _int(size, "response_payload_size", lo=0))
    if "error" in body:
        error = body["error"]
        category = body.get("category")
        error_class = body.get("error_class")
        if not (
            isinstance(error_class, str)
            and len(error_class.encode("utf-8", "replace")) <= _MAX_ERROR_CLASS_BYTES
        ):
            error_class = None
        return FutureFailed(
            error if isinstance(error, str) else ("unknown error" if error is None else str(error)),
            category if category in _ERROR_CATEGORIES else "unknown",
            error_class,
        )
    return FutureResult(body)
