"""Knobs of the local trainer's protocol server, in one frozen value.

Defaults suit an interactive trainer on one machine. Tests shorten the waits (long-poll
hold, gap wait, session expiry) so that the behaviour they check happens in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from firetitan.local.connections import ConnectionLimits

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
        max_retained_result_bytes: How many bytes of finished results are kept at most
            (their encodings, estimated); beyond it the oldest are evicted first, as
            above. The newest result is always kept, however large.
        max_samples_per_request: Most ``num_samples`` one sampling request may ask for.
        max_sampled_tokens_per_request: Most tokens one sampling request may generate,
            ``num_samples * max_tokens`` (an unset ``max_tokens`` counts as
            `firetitan.local.engine.DEFAULT_MAX_TOKENS`): one request holds the single
            engine thread while it runs, so this bounds how long every other model
            waits behind it.
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
        debug_endpoints: Serve the ``debug_execution_log`` endpoint (authenticated).
        head_timeout_seconds: Time a connection has to deliver a complete request head;
            then it gets 408 and is closed.
        body_timeout_seconds: Time a request body has to arrive after its head; then the
            request gets 408 and its connection is closed.
        max_connections: Open connections at most; a new one beyond gets 503 and is
            closed at once, so a flood of idle sockets cannot exhaust descriptors.
        max_seq_id_lead: How far ahead of a model's next expected ``seq_id`` a request
            may be; further is refused (422). A client is only ahead by the requests it
            has in flight, so this is sized like ``max_pending_requests``; without a
            bound one stray request far ahead makes every later one "arrive late".
    """

    max_request_bytes: int = attrs.field(default=64 * MiB, validator=_positive)
    decode_in_thread_bytes: int = attrs.field(default=256 * 1024, validator=_positive)
    long_poll_seconds: float = attrs.field(default=25.0, validator=_positive)
    gap_wait_seconds: float = attrs.field(default=60.0, validator=_positive)
    result_retention_seconds: float = attrs.field(default=15 * 60.0, validator=_positive)
    max_retained_results: int = attrs.field(default=10_000, validator=_positive)
    max_retained_result_bytes: int = attrs.field(default=512 * MiB, validator=_positive)
    max_samples_per_request: int = attrs.field(default=128, validator=_positive)
    max_sampled_tokens_per_request: int = attrs.field(default=65_536, validator=_positive)
    max_pending_requests: int = attrs.field(default=100_000, validator=_positive)
    session_expiry_seconds: float = attrs.field(default=5 * 60.0, validator=_positive)
    maintenance_interval_seconds: float = attrs.field(default=5.0, validator=_positive)
    shutdown_grace_seconds: float = attrs.field(default=5.0, validator=_positive)
    execution_log_path: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    max_execution_log_entries: int = attrs.field(default=100_000, validator=_positive)
    debug_endpoints: bool = False
    head_timeout_seconds: float = attrs.field(default=15.0, validator=_positive)
    body_timeout_seconds: float = attrs.field(default=120.0, validator=_positive)
    max_connections: int = attrs.field(default=512, validator=_positive)
    max_seq_id_lead: int = attrs.field(default=100_000, validator=_positive)

    @property
    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            head_timeout_seconds=self.head_timeout_seconds,
            body_timeout_seconds=self.body_timeout_seconds,
            max_connections=self.max_connections,
        )

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """Names accepted as keyword arguments (``LocalTrainer(**limits)`` checks them)."""
        return frozenset(a.name for a in attrs.fields(cls))
