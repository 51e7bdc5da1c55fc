"""What tinker 0.38 needs from the local trainer beyond the Fireworks contract.

Read from the ``tinker`` 0.38.0 client (``lib/internal_client_holder.py``,
``lib/api_future_impl.py``, ``lib/public_interfaces/*``, ``resources/*``). How the
server tells the two client populations apart lives in `firetitan.local.tinker.dialect`;
protobuf requests are decoded by `firetitan.local.tinker.wire` and protobuf results
encoded by `firetitan._wire`. This module holds the remaining pure helpers. Paths are
in `firetitan._wire.endpoints`.

What tinker expects, and where the trainer serves it:

* Keys start with ``tml-`` (or are a JWT); tinker refuses anything else before sending
  (`tinker_accepts_api_key`). Generated keys have the prefix.
* ``client/config`` is called whatever the key, before ``create_session``: it answers
  the chunk knobs (``fwdbwd_max_chunk_len``, ``fwdbwd_max_chunk_bytes_count``), turns
  on tinker's sampling features (``sample_use_retrieve_futures``,
  ``sample_join_sampling_session``: `firetitan.local.completions`) and
  ``custom_loss_server_side`` (tinker uploads the losses ``create_custom_loss`` traces,
  ``create_custom_loss`` checks them against an allowlist and a ``forward_backward``
  with ``loss_fn="custom"`` runs them: `firetitan.local.loss_graphs`), and leaves off
  both proto compression flags. ``client/dynamic_config`` turns on ``sample_cancel_enabled``;
  ``sessions/{id}/finish`` is answered.
* Every forward and forward_backward arrives on ``/forward_backward`` as protobuf
  (``forward_only`` marks a forward), possibly zstd-compressed; automatic
  decompression is off so that `tinker_wire.decompress_body` enforces the size cap.
  A readable body with invalid data is accepted and fails its future with category
  ``user``: a refused forward POST would poison tinker's whole training client.
* ``retrieve_future`` answers forward and sampling results as protobuf when the poll
  accepts only protobuf (tinker raises on a JSON success payload for those; wire.md
  §12 says otherwise and is wrong for 0.38). Pending, metadata and failure answers,
  and every other result type, stay JSON.
* Model ids are ``<session_id>:train:<model_seq_id>``; create-from-checkpoint is a
  ``load_weights`` without ``model_id``/``seq_id`` that creates the model from the
  spec its state manifest records. ``get_info`` follows every model creation and needs
  ``model_data.model_name``.
* Saves answer ``tinker://<job>/weights/<name>`` and
  ``tinker://<job>/sampler_weights/<name>`` to tinker sessions (`tinker_path`; tinker's
  ``create_sampling_client`` refuses other paths) and bare names to Fireworks sessions;
  incoming paths are accepted in either form (`store_path`).
* Path-less ``save_weights_for_sampler`` (``sampling_session_seq_id``) opens a sampling
  session; ``GET samplers/{id}`` names its base model and path.
* ``asample`` acknowledgements carry ``sample_sequence_ids`` (`sample_sequence_ids`);
  ``prompt_logprobs_last_n`` is applied (`mask_prompt_logprobs`, also to top-k rows);
  top-k prompt and sampled logprobs, ``target_prompt_logprobs`` (answered in the
  request's dense or CSR layout) and ``prompt_alt_tokens_k`` are computed by the engine
  (`firetitan.local.sample_scores`); options the trainer cannot honour (another
  optimizer, ``weights_access_token``) are refused by `check_tinker_options`.
  ``record_stability_info`` keeps what ``stable_reinforce`` trains on (`firetitan.local.stability`).
  ``compute_logprobs`` is an ``asample`` with ``prompt_logprobs``; position 0 is NaN.

``cancel_future`` drops a sampling request that has not run (`Executor.cancel`).
``save_weights_external`` and the REST endpoints (``training_runs/...``,
``checkpoints``, ``sessions/...``, ``weights_info``, ``copy_weights``) are
`firetitan.local.external` and `firetitan.local.rest`.

Not served, and not called with the flags above: ``create_custom_loss``,
``auth/token``, and the REST-only session trace export and project assignment.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt

from firetitan._checkpoint_paths import CheckpointRef, validate_name
from firetitan._wire import WireError
from firetitan.local.checkpoints import Kind

__all__ = [
    "TINKER_KEY_PREFIX",
    "TINKER_SCHEME",
    "TinkerPath",
    "check_tinker_options",
    "is_tinker_path",
    "is_tinker_sdk",
    "mask_prompt_logprobs",
    "parse_tinker_path",
    "sample_sequence_ids",
    "store_path",
    "tinker_accepts_api_key",
    "tinker_path",
]

TINKER_KEY_PREFIX: Final = "tml-"
TINKER_SCHEME: Final = "tinker://"
# The path segment tinker uses for each store kind.
_SEGMENT: Final[dict[Kind, str]] = {
    "state": "weights",
    "sampler": "sampler_weights",
    "external": "external_weights",
}
_KIND_OF_SEGMENT: Final[dict[str, Kind]] = {v: k for k, v in _SEGMENT.items()}
_VERSION_RE = re.compile(r"(\d+)\.(\d+)")


# --------------------------------------------------------------------------- clients


def tinker_accepts_api_key(api_key: str) -> bool:
    """Whether tinker 0.38 will send this key at all (it refuses others client-side).

    Args:
        api_key: The key the trainer expects.

    Returns:
        True for ``tml-...`` keys and JWTs (``eyJ...``).
    """
    return api_key.startswith((TINKER_KEY_PREFIX, "eyJ"))


def is_tinker_sdk(sdk_version: object) -> bool:
    """Whether a ``create_session`` (or ``client/config``) came from a tinker SDK.

    The Fireworks fork, and the firetitan client after it, pin the protocol version
    ``"0.23.0"``; tinker sends its own package version (``"0.38.0"``). Anything
    unreadable counts as Fireworks, whose path forms the firetitan client uses too.

    Args:
        sdk_version: The body's ``sdk_version`` value.

    Returns:
        True for a version 0.24 or later.
    """
    if not isinstance(sdk_version, str):
        return False
    match = _VERSION_RE.match(sdk_version.strip())
    if match is None:
        return False
    return (int(match[1]), int(match[2])) >= (0, 24)


def sample_sequence_ids(request_key: str, num_samples: int) -> list[str]:
    """The ``sample_sequence_ids`` of an ``asample`` ACK: one id per requested sample.

    tinker stamps them onto the returned sequences (as ``sequence_id``) and uses them
    to refer to a sequence later, so they must be unique in the session and the same
    for a retried request: derive ``request_key`` from what identifies the request,
    e.g. ``f"{sampling_session_id}:{seq_id}"``, or its request id.

    Args:
        request_key: A string unique to the request.
        num_samples: The request's ``num_samples``.

    Returns:
        ``num_samples`` ids, in sample order.

    Raises:
        ValueError: An empty key or ``num_samples`` below 1.
    """
    if not request_key:
        raise ValueError("request key must not be empty")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return [f"{request_key}:{i}" for i in range(num_samples)]


# --------------------------------------------------------------------------- paths


@attrs.frozen
class TinkerPath:
    """A parsed ``tinker://<job_id>/<weights|sampler_weights>/<name>`` path.

    Attributes:
        job_id: The trainer job that owns the checkpoint.
        kind: ``"state"`` (``weights``) or ``"sampler"`` (``sampler_weights``).
        name: The checkpoint name.
    """

    job_id: str
    kind: Kind
    name: str

    def __str__(self) -> str:
        return tinker_path(self.job_id, self.kind, self.name)

    def checkpoint_ref(self, current_job_id: str) -> CheckpointRef:
        """The store reference: this job's checkpoint, or another job's (cross-job)."""
        return CheckpointRef(self.name, None if self.job_id == current_job_id else self.job_id)


def tinker_path(job_id: str, kind: Kind, name: str) -> str:
    """Build ``tinker://<job_id>/<weights|sampler_weights>/<name>``.

    tinker splits such a path into exactly three segments and reads the middle one as
    the checkpoint type, so job id and name must be single segments: both pass
    `firetitan._checkpoint_paths.validate_name`.

    Raises:
        ValueError: An invalid job id or name, or an unknown kind.
    """
    if kind not in _SEGMENT:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    job = validate_name(job_id, "job id")
    return f"{TINKER_SCHEME}{job}/{_SEGMENT[kind]}/{validate_name(name)}"


def is_tinker_path(path: object) -> bool:
    """Whether a path uses the ``tinker://`` scheme (valid or not)."""
    return isinstance(path, str) and path.strip().startswith(TINKER_SCHEME)


def parse_tinker_path(path: object) -> TinkerPath:
    """Parse a ``tinker://`` path the way tinker splits it: three segments.

    Raises:
        ValueError: Another form, an unknown segment (``external_weights`` included) or
            an invalid job id or name; the message says which.
    """
    if not isinstance(path, str) or not is_tinker_path(path):
        raise ValueError(f"{path!r} is not a tinker:// path")
    text = path.strip()
    parts = text[len(TINKER_SCHEME) :].split("/")
    if len(parts) != 3:
        raise ValueError(
            f"tinker path {text!r} must look like tinker://<job_id>/weights/<name> or "
            "tinker://<job_id>/sampler_weights/<name>"
        )
    job_id, segment, name = parts
    kind = _KIND_OF_SEGMENT.get(segment)
    if kind is None:
        raise ValueError(
            f"tinker path {text!r} has segment {segment!r}; expected one of "
            f"{sorted(_KIND_OF_SEGMENT)}"
        )
    return TinkerPath(validate_name(job_id, "job id"), kind, validate_name(name))


def store_path(path: str, *, kind: Kind, job_id: str) -> str:
    """Turn a path a client sent into the form ``CheckpointStore.resolve`` takes.

    Args:
        path: A ``tinker://`` path, a bare name or ``cross_job://<job>/<name>``.
        kind: The store kind the caller resolves (``"state"`` for ``load_weights``,
            ``"sampler"`` for a sampling ``model_path``).
        job_id: This trainer's job id.

    Returns:
        For a ``tinker://`` path, a bare name (this job's checkpoint) or a
        ``cross_job://`` path (another job's); any other path unchanged, for the store
        to check.

    Raises:
        ValueError: A malformed ``tinker://`` path, or one of the other kind (e.g. a
            sampler export given to ``load_weights``).
    """
    if not is_tinker_path(path):
        return path
    parsed = parse_tinker_path(path)
    if parsed.kind != kind:
        raise ValueError(
            f"{path.strip()!r} is a {_SEGMENT[parsed.kind]} path; this call needs "
            f"tinker://<job_id>/{_SEGMENT[kind]}/<name>"
        )
    return str(parsed.checkpoint_ref(job_id))


# --------------------------------------------------------------------------- options


def check_tinker_options(endpoint: str, body: Mapping[str, Any]) -> None:
    """Refuse tinker options the codec passes over but this trainer cannot honour.

    Ignoring them would answer something other than what was asked: another
    optimizer's model trained with AdamW.

    Args:
        endpoint: ``"create_model"``, ``"load_weights"`` or ``"optim_step"``; other
            endpoints have nothing to check.
        body: The request's parsed JSON body.

    Raises:
        WireError: Naming the option: an ``optimizer_config`` other than AdamW, a
            ``weights_access_token`` or Dimuon ``optimizer_params``.
    """
    if endpoint in ("create_model", "load_weights"):
        _check_optimizer_config(body.get("optimizer_config"))
    if endpoint == "load_weights" and body.get("weights_access_token") is not None:
        raise WireError("weights_access_token", "is not supported by this trainer")
    if endpoint == "optim_step" and body.get("optimizer_params") is not None:
        raise WireError("optimizer_params", "this trainer only has AdamW; send adam_params instead")


def _check_optimizer_config(value: Any) -> None:
    # tinker sends {"type": "adamw"} by default, {"type": "dimuon", "version": 1} on request.
    if value is None:
        return
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise WireError("optimizer_config", 'must be an object with a "type"')
    if value["type"] != "adamw":
        raise WireError(
            "optimizer_config.type", f"this trainer only has AdamW, not {value['type']!r}"
        )
    extra = sorted(set(value) - {"type"})
    if extra:
        raise WireError("optimizer_config", f"AdamW takes no options here; got {extra}")


def mask_prompt_logprobs(logprobs: npt.ArrayLike, last_n: int | None) -> npt.NDArray[np.float32]:
    """Blank (NaN) every prompt logprob before the last ``last_n``, as tinker expects of
    ``prompt_logprobs_last_n``.

    Args:
        logprobs: One logprob per prompt token (NaN where there is none).
        last_n: How many trailing positions stay scored; None keeps all.

    Returns:
        A new float32 array.

    Raises:
        WireError: ``last_n`` is not between 1 and ``len(prompt) - 1``.
    """
    out = np.array(logprobs, dtype=np.float32)
    if last_n is None:
        return out
    if not 1 <= last_n <= out.size - 1:
        raise WireError(
            "prompt_logprobs_last_n",
            f"must be between 1 and len(prompt) - 1 = {out.size - 1}, got {last_n}",
        )
    out[: out.size - last_n] = math.nan
    return out
