"""The sans-IO codec: tinker types and request/response bodies to and from JSON.

No network, no event loop: the client (``firetitan._async``) and the local trainer
(``firetitan.local``) both build and read every body through this package, so the two
sides cannot drift. ``spec/wire.md`` (§3-§8) is the contract.

Modules (each depends only on those listed before it; this package re-exports every
public name, so import from ``firetitan._wire``):

* `_json`: `WireError`, `dumps`/`loads` and the private primitives: field validators
  and the parsing of number and token arrays.
* `tensors`: tensors (dense and CSR), model inputs and datums.
* `requests`: the request classes (`Request`) and `encode_request`.
* `request_decoders`: `decode_request`.
* `outcomes`: submission acknowledgements (`FutureAck`) and ``retrieve_future`` outcomes.
* `results`: forward/backward results, metric reductions, batch chunking, sampling
  results.
* `proto`: tinker's protobuf results.
* `answers`: decoders of the answers no tinker response type describes.
* `endpoints`: the one endpoint table (name, method, path, request decoder, result
  codec, ordered or not, future or not, poll request type) that the client calls
  through and the local trainer builds its routes from. Import it as a module:
  ``from firetitan._wire import endpoints``.
* `hotload`: the hot-load request and the deployment's per-replica status (§4).
* `completions`: deployment sampling: the completions request, SSE framing and the
  fold of a streamed completion (deployment.md §5).

Conventions:

* ``encode_*`` takes Python objects and returns a JSON-able ``dict`` (numpy arrays may
  appear inside; `dumps` serialises them without a Python loop per element).
* ``decode_*`` takes the parsed JSON (``Any``) and returns typed objects. It validates
  as it goes and raises `WireError` whose ``field`` is the dotted path of the offending
  value, e.g. ``forward_backward_input.data[3].loss_fn_inputs.weights.dtype``.
  Unknown fields are ignored.
* Optional fields that are None are omitted when encoding (as the reference client does).
* Non-finite numbers are refused in both directions.

Numbers on the wire:

* ``int64`` tensors and token lists travel as JSON integers.
* ``float32`` tensors travel, in v1, as the exact float64 value of each float32
  (``0.10000000149011612``); with ``comms: "v2"`` the reference client writes long
  float32 tensors as the shortest decimal that identifies each float32 (``0.1``).
  Decoding parses to float64 and narrows to float32 with `_narrow_to_float32` (in
  `_json`), which corrects the rare double-rounding case (see there), so both forms
  decode bit-exactly.

tinker 0.38 compatibility: tinker's SDK reads ``SampleResponse`` and
``ForwardBackwardOutput`` results only as protobuf; `encode_sample_response_proto` and
`encode_forward_backward_output_proto` write those messages with tinker's own generated
message classes (imported lazily). Its protobuf ``forward_backward`` requests are read by
`firetitan.local.tinker.wire`; everything else tinker sends is JSON and goes through
`decode_request`.
"""

from __future__ import annotations

from firetitan._wire._json import WireError, dumps, loads
from firetitan._wire.completions import (
    Completion,
    CompletionStream,
    SSEDecoder,
    SSEEvent,
    StreamTruncated,
    UpstreamError,
    completion_body,
)
from firetitan._wire.hotload import ReplicaStatus, decode_hot_load_status, hot_load_body
from firetitan._wire.outcomes import (
    CompleteMetadata,
    FutureAck,
    FutureFailed,
    FutureOutcome,
    FutureResult,
    TryAgain,
    decode_future_ack,
    decode_future_outcome,
    encode_future_ack,
    encode_future_outcome,
)
from firetitan._wire.proto import (
    decode_forward_backward_output_proto,
    encode_forward_backward_output_proto,
    encode_sample_response_proto,
)
from firetitan._wire.request_decoders import decode_request
from firetitan._wire.requests import (
    SESSION_HEADER,
    CancelFutureRequest,
    CreateCustomLossRequest,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    CreateSessionRequest,
    ForwardRequest,
    GetInfoRequest,
    LoadWeightsRequest,
    ModelSpec,
    OptimStepRequest,
    Request,
    RetrieveFutureRequest,
    SampleRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    SessionHeartbeatRequest,
    UnloadModelRequest,
    encode_request,
)
from firetitan._wire.results import (
    METRIC_REDUCTIONS,
    chunk_data,
    combine_outputs,
    decode_forward_backward_output,
    decode_sample_response,
    encode_forward_backward_output,
    encode_sample_response,
    validate_metric_keys,
)
from firetitan._wire.tensors import (
    MAX_DENSE_ELEMENTS,
    csr_cells,
    decode_datum,
    decode_model_input,
    decode_tensor,
    encode_datum,
    encode_model_input,
    encode_tensor,
)

__all__ = [
    "MAX_DENSE_ELEMENTS",
    "METRIC_REDUCTIONS",
    "SESSION_HEADER",
    "CancelFutureRequest",
    "CompleteMetadata",
    "Completion",
    "CompletionStream",
    "CreateCustomLossRequest",
    "CreateModelRequest",
    "CreateSamplingSessionRequest",
    "CreateSessionRequest",
    "ForwardRequest",
    "FutureAck",
    "FutureFailed",
    "FutureOutcome",
    "FutureResult",
    "GetInfoRequest",
    "LoadWeightsRequest",
    "ModelSpec",
    "OptimStepRequest",
    "ReplicaStatus",
    "Request",
    "RetrieveFutureRequest",
    "SSEDecoder",
    "SSEEvent",
    "SampleRequest",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsRequest",
    "SessionHeartbeatRequest",
    "StreamTruncated",
    "TryAgain",
    "UnloadModelRequest",
    "UpstreamError",
    "WireError",
    "chunk_data",
    "combine_outputs",
    "completion_body",
    "csr_cells",
    "decode_datum",
    "decode_forward_backward_output",
    "decode_forward_backward_output_proto",
    "decode_future_ack",
    "decode_future_outcome",
    "decode_hot_load_status",
    "decode_model_input",
    "decode_request",
    "decode_sample_response",
    "decode_tensor",
    "dumps",
    "encode_datum",
    "encode_forward_backward_output",
    "encode_forward_backward_output_proto",
    "encode_future_ack",
    "encode_future_outcome",
    "encode_model_input",
    "encode_request",
    "encode_sample_response",
    "encode_sample_response_proto",
    "encode_tensor",
    "hot_load_body",
    "loads",
    "validate_metric_keys",
]
