"""The sans-IO codec: tinker types and request/response bodies to and from JSON.

No network, no event loop: the client (``firetitan._async``) and the local trainer
(``firetitan.local``) both build and read every body through this module, so the two
sides cannot drift. ``spec/wire.md`` (§3-§8) is the contract.

Conventions:

* ``encode_*`` takes Python objects and returns a JSON-able ``dict`` (numpy arrays may
  appear inside; `dumps` serialises them without a Python loop per element).
* ``decode_*`` takes the parsed JSON (``Any``) and returns typed objects. It validates
  as it goes and raises `WireError` whose ``field`` is the dotted path of the offending
  value, e.g. ``forward_backward_input.data[3].loss_fn_inputs.weights.dtype``.
  Unknown fields are ignored.
* Optional fields that are None are omitted when encoding (as the reference client does).
* Non-finite numbers are refused in both directions.

STATUS: interface fixed; bodies are being implemented. Signatures are the contract
between the client, the server and the codec: extend, do not change them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import tinker

__all__ = [
    "CompleteMetadata",
    "CreateModelRequest",
    "CreateSamplingSessionRequest",
    "CreateSessionRequest",
    "FutureFailed",
    "FutureOutcome",
    "FutureResult",
    "ForwardRequest",
    "LoadWeightsRequest",
    "OptimStepRequest",
    "RetrieveFutureRequest",
    "SampleRequest",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsRequest",
    "TryAgain",
    "WireError",
    "chunk_data",
    "combine_outputs",
    "decode_datum",
    "decode_forward_backward_output",
    "decode_future_outcome",
    "decode_model_input",
    "decode_request",
    "decode_sample_response",
    "decode_tensor",
    "dumps",
    "encode_datum",
    "encode_forward_backward_output",
    "encode_future_outcome",
    "encode_model_input",
    "encode_request",
    "encode_sample_response",
    "encode_tensor",
    "loads",
    "validate_metric_keys",
]

JSON = dict[str, Any]


class WireError(ValueError):
    """A body that does not follow the protocol.

    Attributes:
        field: Dotted path of the offending value (``""`` for the whole body).
        reason: What is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- bytes


def dumps(obj: Any) -> bytes:
    """Serialise a JSON-able object (numpy arrays allowed) to UTF-8 bytes.

    Raises:
        WireError: The object holds a non-finite float or a type JSON cannot carry.
    """
    raise NotImplementedError


def loads(data: bytes | str) -> Any:
    """Parse a JSON body.

    Raises:
        WireError: The body is not valid JSON (field ``""``).
    """
    raise NotImplementedError


# --------------------------------------------------------------------------- data


def encode_tensor(tensor: tinker.TensorData, *, v2: bool = False) -> JSON:
    """Encode a `tinker.TensorData` (dense or CSR) as wire.md §6.2 describes.

    With ``v2``, float32 data is written as shortest float32 decimals (§6.4);
    otherwise float32 values are widened to the exact float64 value.
    """
    raise NotImplementedError


def decode_tensor(obj: Any, field: str = "tensor") -> tinker.TensorData:
    """Decode a wire tensor (dense or CSR, densified with zeros) into a dense
    `tinker.TensorData` backed by a numpy array of the declared dtype.

    Raises:
        WireError: Wrong dtype, a shape that does not match the data length, bad CSR
            indices, a non-finite value, or a value that does not fit the dtype.
    """
    raise NotImplementedError


def encode_model_input(model_input: tinker.ModelInput) -> JSON:
    """Encode a `tinker.ModelInput` (``encoded_text`` and ``image`` chunks)."""
    raise NotImplementedError


def decode_model_input(obj: Any, field: str = "model_input") -> tinker.ModelInput:
    """Decode a ModelInput.

    Raises:
        WireError: Unknown chunk type, non-integer or negative token ids, bad image data.
    """
    raise NotImplementedError


def encode_datum(datum: tinker.Datum, *, v2: bool = False) -> JSON:
    """Encode a `tinker.Datum`."""
    raise NotImplementedError


def decode_datum(obj: Any, field: str = "datum") -> tinker.Datum:
    """Decode a Datum.

    Raises:
        WireError: As for `decode_model_input` and `decode_tensor`.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------- requests


@attrs.frozen(kw_only=True)
class CreateSessionRequest:
    """``POST /api/v1/create_session`` (§3.2)."""

    tags: list[str] = attrs.field(factory=list)
    user_metadata: dict[str, str] = attrs.field(factory=dict)
    sdk_version: str = "0.23.0"


@attrs.frozen(kw_only=True)
class CreateModelRequest:
    """``POST /api/v1/create_model`` (§3.7). ``lora_rank == 0`` is full-parameter."""

    session_id: str
    model_seq_id: int
    base_model: str
    lora_rank: int = 0
    lora_alpha: int | None = None
    lora_seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    base_only: bool = False
    user_metadata: dict[str, str] | None = None


@attrs.frozen(kw_only=True)
class ForwardRequest:
    """``POST /api/v1/forward`` (``forward_only``) or ``/api/v1/forward_backward``
    (§3.9, §3.10). The body key is ``forward_input`` or ``forward_backward_input``."""

    model_id: str
    seq_id: int
    data: Sequence[tinker.Datum]
    loss_fn: str
    loss_fn_config: Mapping[str, Any] | None = None
    forward_only: bool = False
    comms: str | None = None


@attrs.frozen(kw_only=True)
class OptimStepRequest:
    """``POST /api/v1/optim_step`` (§3.11)."""

    model_id: str
    seq_id: int
    adam_params: tinker.AdamParams
    grad_accumulation_normalization: str | None = None


@attrs.frozen(kw_only=True)
class SaveWeightsRequest:
    """``POST /api/v1/save_weights`` (§3.12), used by ``save_state``."""

    model_id: str
    seq_id: int
    path: str
    overwrite: bool = False
    ttl_seconds: int | None = None


@attrs.frozen(kw_only=True)
class LoadWeightsRequest:
    """``POST /api/v1/load_weights`` (§3.13). ``optimizer`` restores Adam state too."""

    model_id: str
    seq_id: int
    path: str
    optimizer: bool = False


@attrs.frozen(kw_only=True)
class SaveWeightsForSamplerRequest:
    """``POST /api/v1/save_weights_for_sampler`` (§3.14)."""

    model_id: str
    seq_id: int
    path: str | None = None
    checkpoint_type: str | None = None
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None


@attrs.frozen(kw_only=True)
class RetrieveFutureRequest:
    """``POST /api/v1/retrieve_future`` (§4.2)."""

    request_id: str
    allow_metadata_only: bool = False


@attrs.frozen(kw_only=True)
class CreateSamplingSessionRequest:
    """``POST /api/v1/create_sampling_session`` (tinker sampling)."""

    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


@attrs.frozen(kw_only=True)
class SampleRequest:
    """``POST /api/v1/asample`` (tinker sampling)."""

    prompt: tinker.ModelInput
    num_samples: int
    sampling_params: tinker.SamplingParams
    model_path: str | None = None
    base_model: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool = False


Request = (
    CreateSessionRequest
    | CreateModelRequest
    | ForwardRequest
    | OptimStepRequest
    | SaveWeightsRequest
    | LoadWeightsRequest
    | SaveWeightsForSamplerRequest
    | RetrieveFutureRequest
    | CreateSamplingSessionRequest
    | SampleRequest
)


def encode_request(request: Request) -> JSON:
    """Encode any request above as the body the reference client sends
    (including ``"type"`` discriminators where it sends them)."""
    raise NotImplementedError


def decode_request(endpoint: str, body: Any) -> Request:
    """Decode a request body for an endpoint name (``"forward"``, ``"forward_backward"``,
    ``"optim_step"``, ``"create_model"``, ...).

    Raises:
        WireError: The body is malformed; ``field`` names the offending value.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------- results


def encode_forward_backward_output(output: tinker.ForwardBackwardOutput) -> JSON:
    """Encode a result: dense float32/int64 tensors, finite numbers, metric keys
    ``name:reduction``."""
    raise NotImplementedError


def decode_forward_backward_output(obj: Any) -> tinker.ForwardBackwardOutput:
    """Decode a forward/forward_backward result.

    Raises:
        WireError: Missing keys, bad tensors or non-numeric metrics.
    """
    raise NotImplementedError


def validate_metric_keys(metrics: Mapping[str, float]) -> None:
    """Check that every key has exactly one colon and a known reduction (§6.6).

    Raises:
        ValueError: Naming the first bad key.
    """
    raise NotImplementedError


def combine_outputs(outputs: Sequence[tinker.ForwardBackwardOutput]) -> tinker.ForwardBackwardOutput:
    """Combine the results of the chunks of one call: concatenate ``loss_fn_outputs``
    and reduce metrics by their ``:reduction`` suffix (§6.6)."""
    raise NotImplementedError


def chunk_data(
    data: Sequence[tinker.Datum], *, max_datums: int = 1024, max_bytes: int = 5_000_000
) -> list[list[tinker.Datum]]:
    """Split a batch the way the reference client does (§5.4): at most ``max_datums``
    datums and about ``max_bytes`` estimated bytes per chunk, in order."""
    raise NotImplementedError


def encode_sample_response(response: tinker.SampleResponse) -> JSON:
    """Encode a sampling result as tinker's ``SamplingClient`` reads it."""
    raise NotImplementedError


def decode_sample_response(obj: Any) -> tinker.SampleResponse:
    """Decode a sampling result."""
    raise NotImplementedError


# --------------------------------------------------------------------------- futures


@attrs.frozen
class TryAgain:
    """Still pending (§4.3, outcome 1)."""

    request_id: str
    queue_state: str | None = "active"


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
    """Encode a ``retrieve_future`` answer."""
    raise NotImplementedError


def decode_future_outcome(obj: Any) -> FutureOutcome:
    """Classify a ``retrieve_future`` answer in the reference client's order (§4.3).

    Raises:
        WireError: The body is not a JSON object.
    """
    raise NotImplementedError
