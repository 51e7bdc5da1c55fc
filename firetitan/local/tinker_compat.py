"""What tinker 0.38 needs from the local trainer beyond the Fireworks contract.

Read from the ``tinker`` 0.38.0 client (``lib/internal_client_holder.py``,
``lib/api_future_impl.py``, ``lib/public_interfaces/*``, ``resources/*``). Protobuf
requests are decoded by `firetitan.local.tinker_wire` and protobuf results encoded by
`firetitan._wire`; the helpers below are the remaining pure parts. Paths are under
``/api/v1``; "direct" means a plain JSON answer, "future" an ACK plus
``retrieve_future``.

Already served (``server.py``, ``operations.py``, ``sessions.py``): ``client/config``
with both proto flags off, ``client/dynamic_config``, ``sessions/{id}/finish``, 410 for
heartbeats of ended sessions, random ``tml-`` keys (tinker refuses any key without that
prefix, or a JWT, before sending anything: `tinker_accepts_api_key`), model ids
``<session_id>:train:<model_seq_id>`` (``sessions.model_id_for``), create-via-load
``load_weights`` from the ModelSpec the state manifest records, path-less
``save_weights_for_sampler`` (``sampling_session_seq_id``) opening a sampling session,
``create_sampling_session`` and ``asample``.

Server checklist: still to do
=============================

1. [ ] ``forward_backward`` (future) in protobuf. tinker sends every forward and
   forward_backward here as protobuf (``forward_only`` marks a forward; it never calls
   ``/forward``). Today ``_forward`` JSON-parses the body and answers 400, which makes
   tinker's training client refuse all later calls. When
   `tinker_wire.is_tinker_protobuf` (request headers): read the body under
   ``max_request_bytes``; off the loop for large bodies, call
   `tinker_wire.decode_forward_backward_request` (``content_encoding`` from the header,
   ``max_body_bytes=config.max_request_bytes``); then take ``_ordered``'s path with the
   decoded request (dedup on ``(model_id, seq_id)``, model check,
   ``operations.forward``). `tinker_wire.InvalidForwardData` carries ``model_id``,
   ``seq_id`` and ``forward_only``: queue a run at that seq_id that fails with category
   ``user``, rather than 400 + ``skip_seq`` (spec §5.5: a refused POST poisons tinker's
   client, a failed future fails only that call). Any other ``WireError`` stays a 400;
   `tinker_wire.UnsupportedContentEncoding` is a 415. Chunks of one call have
   contiguous seq_ids; in parallel mode the first chunk is sent last.
2. [ ] aiohttp decodes ``Content-Encoding`` itself and, lacking ``backports.zstd``,
   answers a zstd body with a plain-text 400 before any handler runs. Build the
   ``web.AppRunner`` with ``auto_decompress=False`` so that bodies reach
   `tinker_wire.decompress_body` and its size cap (neither client compresses unless
   ``proto_compress_fwdbwd`` is on; keep it off: the Fireworks client refuses to run
   with it).
3. [ ] ``client/config``: add tinker's chunk knobs, ``fwdbwd_max_chunk_len`` (1024) and
   ``fwdbwd_max_chunk_bytes_count`` (tinker's estimate of a chunk's protobuf size; keep
   it at most about half of ``max_request_bytes``, since one oversized datum still
   goes alone), and pin the flags that would make tinker call endpoints this trainer
   lacks: ``sample_use_retrieve_futures``, ``custom_loss_server_side``,
   ``sample_join_sampling_session`` all false. tinker calls ``client/config`` whatever
   the key, before ``create_session``; 404 would be fatal.
4. [ ] ``retrieve_future``: tinker polls ForwardBackwardOutput and SampleResponse results
   with ``Accept: application/x-protobuf`` alone and **raises on a JSON success
   payload** (``api_future_impl._handle_outcome``; ``spec/wire.md`` §12.1 and §12.3 say
   JSON is still read, which is wrong for 0.38). Results are stored as JSON bytes when
   they run; keep the ``tinker.ForwardBackwardOutput`` / ``tinker.SampleResponse`` (or
   also encode them with `firetitan._wire.encode_forward_backward_output_proto` /
   `firetitan._wire.encode_sample_response_proto`) and, when
   `tinker_wire.wants_protobuf_result` (poll headers), answer 200 with ``Content-Type:
   application/x-protobuf``. ``try_again``, ``complete_metadata`` and failures stay
   JSON (tinker reads any non-protobuf answer as JSON), as do all other result types.
   Metric keys still need ``name:reduction``; tinker's reductions are sum, mean, min,
   max, slack, hash2 and unique.
5. [ ] ``asample`` ACK: add ``"sample_sequence_ids"``, one string per sample
   (`sample_sequence_ids`); tinker asserts on it and stamps the ids onto the returned
   sequences. tinker sends ``topk_prompt_logprobs``, ``topk_sample_logprobs``,
   ``prompt_alt_tokens_k``, ``target_prompt_logprobs``, ``record_stability_info`` and
   ``prompt_logprobs_last_n``, which the codec decodes and ``operations.sample``
   ignores: refuse the unsupported ones (`check_tinker_options`) and apply
   ``prompt_logprobs_last_n`` with `mask_prompt_logprobs` (tinker fails a response
   that scores earlier positions). Sampling seq_ids start at 0 and are not ordered;
   tinker resends after a 429 (it sets ``X-Tinker-Sampling-Backpressure: 1``).
   ``compute_logprobs`` is an ``asample`` with ``num_samples=1``, ``max_tokens=1`` and
   ``prompt_logprobs``; it returns one logprob per prompt token, NaN (read as None) at
   position 0.
6. [ ] ``GET samplers/{sampling_session_id}`` (direct) -> ``{"sampler_id",
   "base_model", "model_path"}``: missing, and required whenever a sampling client is
   created without a base model (``create_sampling_client(model_path=...)`` on the
   service or training client). Sampler export manifests do not record the base model
   yet: add the ModelSpec (as state manifests do).
7. [ ] ``tinker://`` paths. Record at ``create_session`` whether the client is tinker
   (`is_tinker_sdk` on ``sdk_version``: tinker sends ``"0.38.0"``, Fireworks pins
   ``"0.23.0"``) and, for its sessions, answer ``save_weights`` with
   ``tinker_path(job_id, "state", name)`` and ``save_weights_for_sampler`` (with a
   name) with ``tinker_path(job_id, "sampler", name)``: tinker's
   ``create_sampling_client`` refuses a ``model_path`` without the scheme, and its users
   pass these paths back. Fireworks sessions keep bare names (their client refuses
   ``tinker://``). Accept ``tinker://`` wherever a path comes in: `store_path` maps it
   to what ``CheckpointStore.resolve`` takes (``load_weights`` and create-via-load:
   kind ``state``; ``create_sampling_session``/``asample`` ``model_path``: kind
   ``sampler``) instead of ``_valid_path``'s ``parse_checkpoint_path``. A
   ``/weights/`` path given as a ``model_path`` (tinker's own docs do this) names a
   state checkpoint, which ``SampleSource`` cannot express: refuse it with a clear
   user error, or load it into a sampling model.
8. [ ] Options the codec skips: `check_tinker_options` on the raw body in
   ``create_model`` and ``load_weights`` (``optimizer_config`` other than AdamW;
   ``weights_access_token``), ``optim_step`` (Dimuon's ``optimizer_params``) and
   ``asample`` (item 5).

Nothing to do: ``save_weights`` adds ``user_metadata`` and may send ``overwrite:
true`` and ``ttl_seconds`` (the codec reads them); ``kind: "inflight"`` sampler saves
may be served as snapshots (the contract allows the saved weights or newer);
``forward_backward_custom`` is a forward then a ``cross_entropy`` backward on seq_ids
reserved up front; tinker has no ``unload_model`` (models live until their session
ends); ``get_info`` is called after every model creation and needs
``model_data.model_name`` (``get_tokenizer()`` loads ``tokenizer_id``, cut at ``:``, or
else ``model_name``). Not called with the flags above: ``retrieve_futures``,
``cancel_future``, ``join_sampling_session``, ``create_custom_loss``, ``auth/token``,
and the REST-only ``training_runs/...``, ``checkpoints``, ``weights_info``,
``copy_weights``, ``save_weights_external``, ``sessions/...``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt

from firetitan._names import CheckpointRef, validate_name
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
# The path segment tinker uses for each store kind (tinker also has "external_weights",
# for exports this trainer does not make).
_SEGMENT: Final[dict[Kind, str]] = {"state": "weights", "sampler": "sampler_weights"}
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
    `firetitan._names.validate_name`.

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
            f"tinker path {text!r} has segment {segment!r}; this trainer serves "
            "'weights' and 'sampler_weights'"
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
    optimizer's model trained with AdamW, a sample without the requested top-k.

    Args:
        endpoint: ``"create_model"``, ``"load_weights"``, ``"optim_step"`` or
            ``"asample"``; other endpoints have nothing to check.
        body: The request's parsed JSON body.

    Raises:
        WireError: Naming the option: an ``optimizer_config`` other than AdamW, a
            ``weights_access_token``, Dimuon ``optimizer_params``, or a sampling option
            above its default (``topk_prompt_logprobs``, ``topk_sample_logprobs``,
            ``prompt_alt_tokens_k``, ``target_prompt_logprobs``,
            ``record_stability_info``).
    """
    if endpoint in ("create_model", "load_weights"):
        _check_optimizer_config(body.get("optimizer_config"))
    if endpoint == "load_weights" and body.get("weights_access_token") is not None:
        raise WireError("weights_access_token", "is not supported by this trainer")
    if endpoint == "optim_step" and body.get("optimizer_params") is not None:
        raise WireError("optimizer_params", "this trainer only has AdamW; send adam_params instead")
    if endpoint == "asample":
        for key in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(key) not in (None, 0):
                raise WireError(key, "is not supported by this trainer; send 0")
        for key in ("target_prompt_logprobs", "record_stability_info"):
            if body.get(key) not in (None, False):
                raise WireError(key, "is not supported by this trainer")


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
