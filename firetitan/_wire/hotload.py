"""Hot-load bodies (deployment.md §4): the request that loads a snapshot into a
deployment, and the per-replica status the deployment reports.
"""

from __future__ import annotations

from typing import Any

import attrs

from firetitan._wire._json import WireError

__all__ = ["ReplicaStatus", "decode_hot_load_status", "hot_load_body"]

#: What the product's hot-load metadata names for its delta format (fireworks-delta-compression).
DELTA_COMPRESSION = "arc_v2"
DELTA_CHECKSUM = "alder32"  # sic: the protocol's spelling


def hot_load_body(
    identity: str, *, previous: str | None, reset_prompt_cache: bool
) -> dict[str, Any]:
    """The body of the ``hot_load`` endpoint (`firetitan._wire.endpoints.HOT_LOAD`).

    Args:
        identity: The snapshot to load.
        previous: For a delta snapshot, the snapshot it applies to; None for a base.
        reset_prompt_cache: Ask the deployment to drop prompt caches built on the old
            weights; False leaves the field out (for deployments that refuse it).
    """
    body: dict[str, Any] = {"identity": identity}
    if reset_prompt_cache:
        body["reset_prompt_cache"] = True
    if previous is not None:
        body["incremental_snapshot_metadata"] = {
            "previous_snapshot_identity": previous,
            "compression_format": DELTA_COMPRESSION,
            "checksum_format": DELTA_CHECKSUM,
        }
    return body


@attrs.frozen
class ReplicaStatus:
    """What one replica reports.

    Attributes:
        replica_id: Its name, or its position when it has none.
        identity: The snapshot it serves, if any.
        ready: Whether it serves.
        stage: Its loading stage (``error`` is the only one with a fixed meaning).
        target: The snapshot it is loading or failed to load.
        message: Its explanation of a failure, when it gave one.
        adapters: Adapter snapshots it reports as loaded (multi-LoRA deployments).
    """

    replica_id: str
    identity: str | None
    ready: bool
    stage: str | None = None
    target: str | None = None
    message: str | None = None
    adapters: frozenset[str] = frozenset()

    def serves(self, identity: str) -> bool:
        """Whether it is ready and serving ``identity``."""
        return self.ready and (self.identity == identity or identity in self.adapters)

    def failed(self, identity: str) -> bool:
        """Whether it reports that loading ``identity`` failed."""
        return self.stage == "error" and self.target == identity

    def describe(self) -> str:
        """One line for error messages: what it serves and what it is doing."""
        text = f"{self.replica_id}: serving {self.identity or 'nothing'}"
        text += "" if self.ready else " (not ready)"
        if self.stage is not None:
            text += f", stage {self.stage}"
            if self.target is not None:
                text += f" for {self.target}"
        if self.message:
            text += f" ({self.message})"
        return text


def decode_hot_load_status(obj: Any) -> list[ReplicaStatus]:
    """Read a ``hot_load_status`` answer: every replica, in order.

    A replica's ``loading_state`` may be absent or null; unknown keys are ignored.

    Raises:
        WireError: No ``replicas`` list, or a replica that is not an object.
    """
    replicas = obj.get("replicas") if isinstance(obj, dict) else None
    if not isinstance(replicas, list):
        raise WireError("replicas", "the hot-load status has no replicas list")
    out = []
    for i, raw in enumerate(replicas):
        if not isinstance(raw, dict):
            raise WireError(f"replicas[{i}]", "not an object")
        state = raw.get("loading_state")
        state = state if isinstance(state, dict) else {}
        message = state.get("message") or state.get("error")
        adapters = raw.get("loaded_adapters")
        loaded = frozenset(
            a["identity"]
            for a in (adapters if isinstance(adapters, list) else [])
            if isinstance(a, dict)
            and a.get("status") == "loaded"
            and isinstance(a.get("identity"), str)
        )
        out.append(
            ReplicaStatus(
                replica_id=_text(raw.get("replica_id")) or f"replica {i}",
                identity=_text(raw.get("current_snapshot_identity")),
                ready=raw.get("readiness") is True,
                stage=_text(state.get("stage")),
                target=_text(state.get("target_snapshot_identity")),
                message=None if message is None else str(message)[:500],
                adapters=loaded,
            )
        )
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
