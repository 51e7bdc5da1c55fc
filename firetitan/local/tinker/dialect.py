"""Which client population a request comes from: every such decision is made here.

The local trainer serves two families of clients over one protocol. The Fireworks SDK
and the firetitan client speak JSON everywhere and name checkpoints by bare names;
tinker 0.38 sends forward and forward_backward as protobuf, reads those results and
sampling results only as protobuf, and passes ``tinker://`` paths around. Neither
announces itself with a flag, and no single signal tells them apart everywhere, so
each decision reads the one signal that is reliable at that point:

* **Request body** (``Content-Type``). Only tinker sends protobuf bodies, and a body
  is read the way it is labelled whoever sent it, so the label is the whole truth.
* **Result encoding** (the ``Accept`` header of each ``retrieve_future`` poll). The
  poller, not the submitter, must parse the answer: tinker asks for protobuf alone
  and refuses a JSON success for those result types, while the Fireworks client
  lists JSON too and is answered in JSON.
* **Path style** (``sdk_version`` at ``create_session``). Paths are handed out by
  calls (``save_weights``, ``save_weights_for_sampler``) whose bodies look alike from
  both clients, so only the session knows who will read them: tinker refuses a
  sampler path without the ``tinker://`` scheme, the Fireworks client refuses one
  with it. tinker sends its package version; Fireworks (and firetitan after it) pin
  ``0.23.0``. The session's dialect also predicts which encoding its client will
  poll for (`likely_encoding`), so that one is made as soon as the result exists.

What comes in needs no decision: both path grammars are accepted from everyone, and
tinker's options that the trainer cannot honour are refused whoever sends them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local.checkpoints import Kind
from firetitan.local.executor import Encoding
from firetitan.local.tinker import compat as tinker_compat
from firetitan.local.tinker import wire as tinker_wire

__all__ = [
    "Dialect",
    "body_is_protobuf",
    "checkpoint_path",
    "likely_encoding",
    "result_encoding",
    "session_dialect",
]


class Dialect(enum.Enum):
    """The path style a session's client reads."""

    FIREWORKS = "fireworks"
    TINKER = "tinker"


def body_is_protobuf(headers: Mapping[str, str]) -> bool:
    """Whether a request body is a tinker protobuf message (else it is JSON)."""
    return tinker_wire.is_tinker_protobuf(headers)


def result_encoding(headers: Mapping[str, str]) -> Encoding:
    """The encoding a ``retrieve_future`` poll asks for. Results that have no protobuf
    form are answered in JSON whatever this says."""
    return "protobuf" if tinker_wire.wants_protobuf_result(headers) else "json"


def likely_encoding(dialect: Dialect) -> Encoding:
    """The encoding a session's client will poll its forward and sampling results in.

    Only a guess, used to make that encoding as soon as the result exists (on the
    engine thread, where a result that cannot be encoded fails its request); the
    poll's ``Accept`` header still decides what is sent.
    """
    return "protobuf" if dialect is Dialect.TINKER else "json"


def session_dialect(sdk_version: object) -> Dialect:
    """The dialect of a session, from its ``create_session`` ``sdk_version``."""
    return Dialect.TINKER if tinker_compat.is_tinker_sdk(sdk_version) else Dialect.FIREWORKS


def checkpoint_path(dialect: Dialect, kind: Kind, ref: CheckpointRef, job_id: str) -> str:
    """The path to hand a session's client for a checkpoint.

    Args:
        dialect: The session's dialect.
        kind: ``"state"`` or ``"sampler"``.
        ref: The checkpoint, as the store names it.
        job_id: This trainer's job id (the owner when ``ref`` names none).

    Returns:
        ``tinker://<job>/<weights|sampler_weights>/<name>`` for tinker sessions; the
        bare name or ``cross_job://`` path otherwise.

    Raises:
        ValueError: An invalid job id or name.
    """
    if dialect is Dialect.TINKER:
        return tinker_compat.tinker_path(ref.job_id or job_id, kind, ref.name)
    return str(ref)
