"""Who is connected: client sessions, the models they created, and sampling sessions.

Pure bookkeeping on the event loop (no I/O, no engine calls). The server consults it to
answer 404/410 and to derive ids; the maintenance task asks it which sessions stopped
heartbeating. A session's uploaded custom losses (`loss_graphs.LossGraph`) live on it
and end with it.

Ids: a session is ``sess-<16 hex>``, deliberately unlike the serverless ``ts-...`` and
``run-<32 hex>`` shapes, which make clients switch on serverless-only behaviour. A
model is ``<session_id>:train:<model_seq_id>``: tinker 0.38 derives a model id in exactly
this form when it creates a model through ``load_weights``.
"""

from __future__ import annotations

import collections
import secrets
import time
from pathlib import Path

import attrs

from firetitan.local.engine import ModelSpec, UserError
from firetitan.local.loss_graphs import MAX_LOSSES_PER_SESSION, LossGraph
from firetitan.local.tinker.dialect import Dialect

__all__ = ["ModelRecord", "Registry", "SamplingSession", "Session", "model_id_for"]

# How many ended sessions are remembered, to answer their heartbeats with 410 (which
# tells tinker's heartbeat loop to stop) rather than 404.
_ENDED_MEMORY = 10_000


def model_id_for(session_id: str, model_seq_id: int) -> str:
    """The model id for the ``model_seq_id``-th model of a session."""
    return f"{session_id}:train:{model_seq_id}"


@attrs.define(eq=False)
class ModelRecord:
    """A model as the server sees it.

    Attributes:
        create_request_id: The request that creates it (the dedup answer for retries).
        state: ``creating``, ``ready``, ``failed`` or ``unloading``.
        last_export: The folder of its latest sampler export (the base of a ``delta``).
        unload_request_id: The unload request, once one was accepted.
        user_metadata: What the client attached at creation (tinker's training-run
            metadata; tinker-cookbook records its renderer there).
        last_request_time: When a request last named it (wall clock, for tinker's
            REST view).
    """

    model_id: str
    session_id: str
    spec: ModelSpec
    create_request_id: str = ""
    state: str = "creating"
    failure: str | None = None
    last_export: Path | None = None
    unload_request_id: str | None = None
    user_metadata: dict[str, str] | None = None
    last_request_time: float = 0.0


@attrs.define(eq=False)
class Session:
    """A client session; ``dialect`` is the path style its client reads."""

    session_id: str
    last_seen: float
    dialect: Dialect = Dialect.FIREWORKS
    models: set[str] = attrs.field(factory=set)
    user_metadata: dict[str, str] | None = None
    custom_losses: dict[str, LossGraph] = attrs.field(factory=dict)


@attrs.frozen
class SamplingSession:
    """What a tinker sampling session samples from: a sampler export (``model_path``, in
    the form the checkpoint store resolves) or a base model."""

    sampling_session_id: str
    session_id: str
    model_path: str | None
    base_model: str | None


class Registry:
    """Sessions, models and sampling sessions of one trainer (event-loop only)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, ModelRecord] = {}
        self.sampling: dict[str, SamplingSession] = {}
        self._sampling_by_seq: dict[tuple[str, int], str] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._by_idempotency_key: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: The model created last, kept after it is unloaded: tinker's REST view
        #: describes the job's training run by it.
        self.latest_model: ModelRecord | None = None

    # ------------------------------------------------------------------ sessions

    def create_session(
        self,
        now: float,
        idempotency_key: str | None = None,
        dialect: Dialect = Dialect.FIREWORKS,
    ) -> str:
        """Start a session; a retried POST (same idempotency key) gets the same id."""
        if idempotency_key is not None:
            known = self._by_idempotency_key.get(idempotency_key)
            if known is not None and known in self.sessions:
                return known
        session_id = f"sess-{secrets.token_hex(8)}"
        self.sessions[session_id] = Session(session_id, last_seen=now, dialect=dialect)
        if idempotency_key is not None:
            self._by_idempotency_key[idempotency_key] = session_id
            while len(self._by_idempotency_key) > _ENDED_MEMORY:
                self._by_idempotency_key.popitem(last=False)
        return session_id

    def touch(self, session_id: str, now: float) -> bool:
        """Record activity; False if the session is unknown or ended."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.last_seen = now
        return True

    def dialect(self, session_id: str) -> Dialect:
        """A session's dialect; an ended session's models keep the default."""
        session = self.sessions.get(session_id)
        return Dialect.FIREWORKS if session is None else session.dialect

    def ended(self, session_id: str) -> bool:
        return session_id in self._ended

    def expired_sessions(self, now: float, expiry: float) -> list[str]:
        return [s.session_id for s in self.sessions.values() if now - s.last_seen > expiry]

    def end_session(self, session_id: str) -> list[str]:
        """Forget a session; return the ids of its models that still need unloading."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return []
        self._ended[session_id] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
        for key, value in list(self._sampling_by_seq.items()):
            if key[0] == session_id:
                del self._sampling_by_seq[key]
                self.sampling.pop(value, None)
        return sorted(session.models)

    # ------------------------------------------------------------------ models

    def add_model(self, record: ModelRecord) -> None:
        self.models[record.model_id] = record
        self.latest_model = record
        self.sessions[record.session_id].models.add(record.model_id)

    def touch_model(self, model_id: str, now: float) -> None:
        """Activity on a model keeps its session alive, even if heartbeats are late."""
        record = self.models.get(model_id)
        if record is not None:
            record.last_request_time = time.time()
            self.touch(record.session_id, now)

    def remove_model(self, model_id: str) -> None:
        record = self.models.pop(model_id, None)
        if record is not None:
            session = self.sessions.get(record.session_id)
            if session is not None:
                session.models.discard(model_id)

    # ------------------------------------------------------------------ custom losses

    def add_custom_loss(self, graph: LossGraph) -> None:
        """Keep an uploaded loss for its session (which exists and has not ended).

        Raises:
            UserError: The session already holds `MAX_LOSSES_PER_SESSION` losses.
        """
        losses = self.sessions[graph.session_id].custom_losses
        if graph.loss_id not in losses and len(losses) >= MAX_LOSSES_PER_SESSION:
            raise UserError(
                f"session {graph.session_id!r} already holds {len(losses)} custom losses, "
                f"the most one session may create; reuse their LossHandles"
            )
        losses[graph.loss_id] = graph

    def custom_loss(self, session_id: str, loss_id: str) -> LossGraph:
        """The loss ``loss_id`` for a model of ``session_id``.

        Raises:
            UserError: No such loss, or another session's.
        """
        session = self.sessions.get(session_id)
        graph = None if session is None else session.custom_losses.get(loss_id)
        if graph is not None:
            return graph
        if any(loss_id in other.custom_losses for other in self.sessions.values()):
            raise UserError(
                f"loss_fn_config['loss_id']: custom loss {loss_id!r} belongs to another "
                "session; a session can use only the custom losses it created"
            )
        raise UserError(
            f"loss_fn_config['loss_id']: unknown custom loss {loss_id!r}; create it with "
            "create_custom_loss in this model's session"
        )

    # ------------------------------------------------------------------ sampling

    def create_sampling_session(
        self, session_id: str, seq_id: int, model_path: str | None, base_model: str | None
    ) -> SamplingSession:
        """Create (or, for a retried request, find) a sampling session."""
        known = self._sampling_by_seq.get((session_id, seq_id))
        if known is not None:
            return self.sampling[known]
        sampling = SamplingSession(
            f"samp-{secrets.token_hex(8)}", session_id, model_path=model_path, base_model=base_model
        )
        self.sampling[sampling.sampling_session_id] = sampling
        self._sampling_by_seq[(session_id, seq_id)] = sampling.sampling_session_id
        return sampling
