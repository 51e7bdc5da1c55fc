"""Knobs of the local trainer's protocol server, in one frozen value.

Defaults suit an interactive trainer on one machine. Tests shorten the waits (long-poll
hold, gap wait, session expiry) so that the behaviour they check happens in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

__all__ = ["ServerConfig"]

MiB = 1024 * 1024


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Limits and timings of the local trainer's server.

    Attributes:
        max_request_bytes: Largest request body accepted; larger ones get 413.
        decode_in_thread_bytes: Bodies at least this large are parsed and decoded on a
            helper thread, so that a large upload never stalls other requests.
        long_poll_seconds: How long ``retrieve_future`` holds a pending request before
            answering ``try_again``. Stay well under the clients' 45 s header timeout.
        gap_wait_seconds: How long a model waits for a missing ``seq_id`` while later
            ones are queued, before skipping it (refused if it arrives later; the calls
            behind it run).
        result_retention_seconds: How long a finished request's result stays available
            for re-polls.
        max_retained_results: How many finished results are kept at most; the oldest are
            evicted first, and a poll for an evicted one gets 410.
        max_pending_requests: Accepted-but-unfinished requests allowed at once; beyond
            that a new request gets 429 with ``Retry-After``.
        session_expiry_seconds: A session with no heartbeat (or other activity) for this
            long is ended and its models are unloaded.
        maintenance_interval_seconds: How often expiry, eviction and the checkpoint TTL
            sweep run.
        shutdown_grace_seconds: How long a graceful stop waits for open connections.
        execution_log_path: When set, every executed request is also appended to this
            file as one JSON line.
        max_execution_log_entries: How many executed requests the in-memory execution
            log keeps; the oldest are dropped first, so a trainer that runs for days
            stays flat in memory. The file at ``execution_log_path`` keeps them all.
        debug_endpoints: Serve ``GET /api/v1/debug/execution_log`` (authenticated).
    """

    max_request_bytes: int = attrs.field(default=64 * MiB, validator=_positive)
    decode_in_thread_bytes: int = attrs.field(default=256 * 1024, validator=_positive)
    long_poll_seconds: float = attrs.field(default=25.0, validator=_positive)
    gap_wait_seconds: float = attrs.field(default=60.0, validator=_positive)
    result_retention_seconds: float = attrs.field(default=15 * 60.0, validator=_positive)
    max_retained_results: int = attrs.field(default=10_000, validator=_positive)
    max_pending_requests: int = attrs.field(default=100_000, validator=_positive)
    session_expiry_seconds: float = attrs.field(default=5 * 60.0, validator=_positive)
    maintenance_interval_seconds: float = attrs.field(default=5.0, validator=_positive)
    shutdown_grace_seconds: float = attrs.field(default=5.0, validator=_positive)
    execution_log_path: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    max_execution_log_entries: int = attrs.field(default=100_000, validator=_positive)
    debug_endpoints: bool = False

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """Names accepted as keyword arguments (``LocalTrainer(**limits)`` checks them)."""
        return frozenset(a.name for a in attrs.fields(cls))
