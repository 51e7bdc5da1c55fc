"""tinker 0.38's protobuf forward_backward requests, for the local trainer (sans-IO).

tinker 0.38 sends every forward and forward_backward call as a protobuf
``tinker_public.ForwardBackwardRequest`` (``Content-Type: application/x-protobuf``,
plus ``Content-Encoding: zstd`` when the trainer's ``client/config`` says
``proto_compress_fwdbwd``) to the ``forward_backward`` endpoint; a forward pass is the
same message with ``forward_only`` set. This module turns such a body into the codec's
`firetitan._wire.ForwardRequest`, with no network and no event loop, and tells from
headers which wire a request uses and which a ``retrieve_future`` poll wants back
(``spec/wire.md`` §12). The protobuf *results* tinker insists on are encoded by
`firetitan._wire.encode_forward_backward_output_proto` and
`firetitan._wire.encode_sample_response_proto`; what else tinker needs from the server
is listed in `firetitan.local.tinker.compat`.

The message classes are the ones the installed ``tinker`` package ships
(``tinker.proto.tinker_public_pb2``), so the schema cannot drift from the client's.

Decoding follows the JSON codec's rules (``spec/wire.md`` §6) so an engine cannot tell
the two wires apart:

* Tensors come back dense, as numpy-backed `tinker.TensorData` of dtype ``float32`` or
  ``int64`` (int32 widens to int64, bfloat16 to float32), in the declared shape; sparse
  CSR tensors are densified with zeros. Raw bytes are read with ``np.frombuffer``, as
  little-endian whatever the host, never one Python step per element.
* Errors are `WireError` with the JSON codec's field paths, e.g.
  ``forward_backward_input.data[3].loss_fn_inputs.weights.sparse_col_indices[7]``.
  Problems past the addressing raise `InvalidForwardData`, which also carries the
  request's ``model_id``, ``seq_id`` and ``forward_only``: the server can then accept
  the call and fail its future (spec §5.5) instead of rejecting the POST, which would
  poison the client's whole request sequence.
* Only text goes in: image and audio (dmel) chunks are refused by name.
* ``model_input_spans`` / ``loss_fn_input_spans`` (provenance of sampled tokens, which
  ``stable_reinforce`` reads, `firetitan.local.stability`) are kept on the datum.

Size guards: a body is refused above ``max_body_bytes`` *after* decompression (zstd is
inflated in bounded steps, so a small bomb cannot allocate the full size first), and
what sparse tensors may expand to is capped by ``max_dense_elements`` (a CSR tensor is
tiny on the wire but its dense form is rows × cols).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
import numpy as np
import numpy.typing as npt
import tinker
import zstandard

# No type stubs ship for protobuf's runtime; the message classes are typed by tinker's .pyi.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.provenance_spans import (
    PromptProvenanceSpan,
    ProvenanceSpans,
    SampledProvenanceSpan,
)

from firetitan._wire import MAX_DENSE_ELEMENTS, ForwardRequest, WireError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "PROTOBUF_CONTENT_TYPE",
    "InvalidForwardData",
    "UnsupportedContentEncoding",
    "decode_forward_backward_request",
    "decompress_body",
    "is_tinker_protobuf",
    "wants_protobuf_result",
]

PROTOBUF_CONTENT_TYPE: Final = "application/x-protobuf"
#: Default cap on a request body once decompressed. tinker splits a call into chunks of
#: about ``fwdbwd_max_chunk_bytes_count`` (5 MB by default, set by ``client/config``);
#: only a single oversized datum makes a bigger chunk.
DEFAULT_MAX_BODY_BYTES: Final = 64 * 2**20

# Media types that mean "protobuf"; tinker sends the first.
_PROTOBUF_MEDIA_TYPES: Final = frozenset({PROTOBUF_CONTENT_TYPE, "application/protobuf"})
# A zstd block yields at most 128 KiB and takes at least 3 bytes of input, so one input
# byte inflates to under 64 KiB. Feeding about limit / 64 KiB input bytes per step (at
# least 256) bounds one step's output, and so the overshoot before the size check
# stops, by about max(limit, 16 MiB).
_ZSTD_MAX_EXPANSION: Final = 1 << 16
# tinker compresses with zstd's default level, whose window is 2 MiB at most; refusing
# bigger windows stops a frame header from making the decoder reserve up to 128 MiB.
_ZSTD_MAX_WINDOW: Final = 1 << 23
_MAX_NDIM: Final = 16  # as the JSON codec; no loss input needs more than a handful

_I32: Final = np.dtype("<i4")
_I64: Final = np.dtype("<i8")
_U16: Final = np.dtype("<u2")
_F32: Final = np.dtype("<f4")


class UnsupportedContentEncoding(WireError):
    """The body uses a ``Content-Encoding`` other than ``zstd`` or none (HTTP 415)."""


class InvalidForwardData(WireError):
    """A forward_backward request whose addressing is valid but whose data is not.

    Attributes:
        model_id: The model the request was for.
        seq_id: Its sequence number, so the executor can fail it in order.
        forward_only: Whether it was a forward pass.
    """

    def __init__(
        self, field: str, reason: str, *, model_id: str, seq_id: int, forward_only: bool
    ) -> None:
        super().__init__(field, reason)
        self.model_id = model_id
        self.seq_id = seq_id
        self.forward_only = forward_only


# --------------------------------------------------------------------------- headers


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts as well as aiohttp's
    case-insensitive multidicts."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def _media_types(value: str | None) -> set[str]:
    """The media types of a Content-Type or Accept value, parameters dropped."""
    if not value:
        return set()
    return {part.split(";", 1)[0].strip().lower() for part in value.split(",")} - {""}


def is_tinker_protobuf(headers: Mapping[str, str]) -> bool:
    """Whether a request body is protobuf (tinker 0.38) rather than JSON.

    Args:
        headers: The request headers (any case).

    Returns:
        True when ``Content-Type`` is ``application/x-protobuf`` (parameters ignored).
    """
    return bool(_media_types(_header(headers, "Content-Type")) & _PROTOBUF_MEDIA_TYPES)


def wants_protobuf_result(headers: Mapping[str, str]) -> bool:
    """Whether a ``retrieve_future`` poll must be answered with a protobuf result.

    tinker 0.38 asks for ForwardBackwardOutput and SampleResponse results with
    ``Accept: application/x-protobuf`` alone and fails on a JSON success payload. The
    Fireworks client lists ``application/x-protobuf, application/json`` and reads JSON,
    the format the rest of the trainer is tested with, so JSON wins when it is listed.

    Args:
        headers: The ``retrieve_future`` request headers (any case).

    Returns:
        True when ``Accept`` lists protobuf and does not list ``application/json``.
    """
    accepted = _media_types(_header(headers, "Accept"))
    return bool(accepted & _PROTOBUF_MEDIA_TYPES) and "application/json" not in accepted


# --------------------------------------------------------------------------- bytes


def decompress_body(body: bytes, content_encoding: str | None, *, max_bytes: int) -> bytes:
    """Undo the request's ``Content-Encoding`` under a size limit.

    Args:
        body: The raw request body.
        content_encoding: The ``Content-Encoding`` header (None, ``identity`` or ``zstd``).
        max_bytes: The largest body accepted once decompressed.

    Returns:
        The decompressed body.

    Raises:
        UnsupportedContentEncoding: Another encoding.
        WireError: The body is larger than ``max_bytes`` once decompressed, or is not a
            complete zstd frame.
    """
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        if len(body) > max_bytes:
            raise WireError("", f"body is {len(body)} bytes; the limit is {max_bytes}")
        return body
    if coding != "zstd":
        raise UnsupportedContentEncoding(
            "", f"unsupported Content-Encoding {content_encoding!r}; send zstd or no encoding"
        )
    return _zstd_decompress(body, max_bytes)


def _zstd_decompress(body: bytes, limit: int) -> bytes:
    too_big = f"body is over the limit of {limit} bytes once decompressed"
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise WireError("", f"body is not zstd data ({exc})") from None
    if declared > limit:  # -1 (size not in the header) passes; the loop still counts
        raise WireError("", too_big)
    decoder = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
    step = max(256, min(1 << 16, limit // _ZSTD_MAX_EXPANSION))
    view = memoryview(body)
    pieces: list[bytes] = []
    total = 0
    pos = 0
    try:
        while pos < len(body) and not decoder.eof:
            piece = decoder.decompress(view[pos : pos + step])
            pos += step
            total += len(piece)
            if total > limit:
                raise WireError("", too_big)
            pieces.append(piece)
    except zstandard.ZstdError as exc:
        raise WireError("", f"body is not valid zstd data ({exc})") from None
    if not decoder.eof:
        raise WireError("", "zstd body is truncated: the frame does not end")
    if decoder.unused_data or pos < len(body):
        # tinker sends exactly one frame; anything after it is not ours to guess at.
        raise WireError("", "zstd body has data after the end of its frame")
    return b"".join(pieces)


# --------------------------------------------------------------------------- requests


@attrs.frozen
class _Dtype:
    """How one protobuf DType is read (``wire``) and what it becomes (``out``)."""

    wire: np.dtype[Any]
    out: np.dtype[Any]
    name: Literal["float32", "int64"]  # the tinker TensorDtype


_DTYPES: Final[dict[int, _Dtype]] = {
    pb.DTYPE_FLOAT32: _Dtype(_F32, np.dtype(np.float32), "float32"),
    pb.DTYPE_INT64: _Dtype(_I64, np.dtype(np.int64), "int64"),
    pb.DTYPE_INT32: _Dtype(_I32, np.dtype(np.int64), "int64"),
    pb.DTYPE_BFLOAT16: _Dtype(_U16, np.dtype(np.float32), "float32"),
}


class _Budget:
    """How many more elements the sparse tensors of one request may expand to. Dense
    tensors need no budget: their size is what the (size-capped) body holds."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, count: int, field: str) -> None:
        if count > self.left:
            raise WireError(
                field,
                f"sparse tensor expands to {count} elements; the sparse tensors of one "
                f"request may expand to {self.limit} in all",
            )
        self.left -= count


def decode_forward_backward_request(
    body: bytes,
    *,
    content_encoding: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_dense_elements: int = MAX_DENSE_ELEMENTS,
) -> ForwardRequest:
    """Decode a tinker 0.38 protobuf body of the ``forward_backward`` endpoint.

    Field paths in errors are the JSON codec's (``forward_backward_input.data[2]
    .loss_fn_inputs.weights.data``, ``forward_input...`` for a forward pass), so an
    error reads the same whichever wire a request came on.

    Args:
        body: The raw request body.
        content_encoding: The request's ``Content-Encoding`` header, if any.
        max_body_bytes: The largest body accepted once decompressed.
        max_dense_elements: The most elements the sparse (CSR) tensors of the request
            may expand to, in all.

    Returns:
        The request. ``forward_only`` says whether it is a forward pass;
        ``loss_fn_config`` is taken from ``loss_fn_config_v2`` when that is set (numbers
        as float, booleans as 1.0/0.0, strings as str), else from the legacy float map,
        else None.

    Raises:
        UnsupportedContentEncoding: The body has another ``Content-Encoding``.
        InvalidForwardData: ``model_id`` and ``seq_id`` are valid but the data, the loss
            name or the loss config is not.
        WireError: The body is too large, not protobuf, or lacks ``model_id`` or
            ``seq_id``.
    """
    raw = decompress_body(body, content_encoding, max_bytes=max_body_bytes)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise WireError("", f"body is not a tinker ForwardBackwardRequest ({exc})") from None
    if not msg.model_id:
        raise WireError("model_id", "required field is missing")
    if msg.seq_id < 1:
        # proto3 cannot tell 0 from absent; the client numbers requests from 1.
        raise WireError("seq_id", f"must be a positive integer, got {msg.seq_id}")
    key = "forward_input" if msg.forward_only else "forward_backward_input"
    try:
        if not msg.loss_fn:
            raise WireError(f"{key}.loss_fn", "required field is missing")
        if not msg.data:
            raise WireError(f"{key}.data", "must hold at least one datum")
        budget = _Budget(max_dense_elements)
        data = [_decode_datum(d, f"{key}.data[{i}]", budget) for i, d in enumerate(msg.data)]
        loss_fn_config = _decode_loss_fn_config(msg, f"{key}.loss_fn_config")
    except WireError as exc:
        raise InvalidForwardData(
            exc.field,
            exc.reason,
            model_id=msg.model_id,
            seq_id=msg.seq_id,
            forward_only=msg.forward_only,
        ) from None
    return ForwardRequest(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        data=data,
        loss_fn=msg.loss_fn,
        loss_fn_config=loss_fn_config,
        forward_only=msg.forward_only,
    )


def _decode_loss_fn_config(
    msg: pb.ForwardBackwardRequest, field: str
) -> dict[str, float | str] | None:
    # tinker writes every number to both maps and strings only to v2, so v2, when set,
    # is the complete config and the legacy map is a lossy copy of it.
    config: dict[str, float | str] = {}
    if msg.loss_fn_config_v2:
        for name in sorted(msg.loss_fn_config_v2):
            value = msg.loss_fn_config_v2[name]
            kind = value.WhichOneof("value")
            if kind == "number":
                config[name] = _finite(value.number, f"{field}.{name}")
            elif kind == "text":
                config[name] = value.text
            else:
                raise WireError(f"{field}.{name}", "sets neither a number nor a text value")
        return config
    for name in sorted(msg.loss_fn_config):
        config[name] = _finite(msg.loss_fn_config[name], f"{field}.{name}")
    return config or None


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise WireError(field, "non-finite")
    return value


def _decode_datum(msg: pb.Datum, field: str, budget: _Budget) -> tinker.Datum:
    chunks: list[tinker.ModelInputChunk] = [
        _decode_chunk(chunk, f"{field}.model_input.chunks[{j}]")
        for j, chunk in enumerate(msg.model_input)
    ]
    inputs: dict[str, tinker.TensorData] = {}
    for name in sorted(msg.loss_fn_inputs):
        inputs[name] = _decode_tensor(
            msg.loss_fn_inputs[name], f"{field}.loss_fn_inputs.{name}", budget
        )
    datum = tinker.Datum(model_input=tinker.ModelInput(chunks=chunks), loss_fn_inputs=inputs)
    if not (msg.model_input_spans or msg.loss_fn_input_spans):
        return datum
    # proto3 cannot tell an empty list from an absent one; tinker sends both or neither.
    return dataclasses.replace(
        datum,
        model_input_spans=_decode_spans(msg.model_input_spans, f"{field}.model_input_spans"),
        loss_fn_input_spans=_decode_spans(msg.loss_fn_input_spans, f"{field}.loss_fn_input_spans"),
    )


def _decode_spans(spans: Any, field: str) -> ProvenanceSpans:
    out: ProvenanceSpans = []
    for i, span in enumerate(spans):
        arm = span.WhichOneof("span")
        if arm is None:
            raise WireError(f"{field}[{i}]", "sets neither prompt_tokens nor sampled_tokens")
        value = getattr(span, arm)
        kind = SampledProvenanceSpan if arm == "sampled_tokens" else PromptProvenanceSpan
        try:
            out.append(
                kind(sequence_id=value.sequence_id, offset=value.offset, length=value.length)
            )
        except ValueError as exc:
            raise WireError(f"{field}[{i}]", str(exc)) from None
    return out


def _decode_chunk(msg: pb.Chunk, field: str) -> tinker.EncodedTextChunk:
    kind = msg.WhichOneof("chunk")
    if kind == "encoded_text":
        tokens = _frombuffer(msg.encoded_text.tokens, _I32, f"{field}.tokens")
        if tokens.size and int(tokens.min()) < 0:
            at = int(np.flatnonzero(tokens < 0)[0])
            raise WireError(f"{field}.tokens[{at}]", f"token id {int(tokens[at])} is out of range")
        # The list comes from an int32 array just checked, so pydantic's per-element
        # validation (about half the cost for long sequences) would prove nothing new.
        return tinker.EncodedTextChunk.model_construct(tokens=tokens.tolist())
    if kind == "image":
        raise WireError(
            f"{field}.type", "image chunks are not supported by this trainer; send encoded_text"
        )
    if kind == "dmel":
        raise WireError(
            f"{field}.type",
            "audio (dmel) chunks are not supported by this trainer; send encoded_text",
        )
    raise WireError(f"{field}.type", "unknown chunk type; expected encoded_text")


def _frombuffer(raw: bytes, dtype: np.dtype[Any], field: str) -> npt.NDArray[Any]:
    """A read-only view of little-endian raw bytes."""
    if len(raw) % dtype.itemsize:
        raise WireError(
            field, f"{len(raw)} bytes is not a whole number of {dtype.itemsize}-byte values"
        )
    return np.frombuffer(raw, dtype=dtype)


def _widen(values: npt.NDArray[Any], spec: _Dtype, field: str) -> npt.NDArray[Any]:
    """Convert wire values into a new, writable array of the tinker dtype."""
    if spec.wire == _U16:
        # bfloat16 is the upper half of a float32: shifting it up is exact.
        bits = values.astype(np.uint32)
        bits <<= 16
        out = bits.view(np.float32)
    else:
        out = values.astype(spec.out)  # always a copy, so TensorData need not copy again
    if spec.name == "float32":
        finite = np.isfinite(out)
        if not finite.all():
            raise WireError(f"{field}[{int(np.flatnonzero(~finite)[0])}]", "non-finite")
    return out


def _decode_tensor(msg: pb.Tensor, field: str, budget: _Budget) -> tinker.TensorData:
    spec = _DTYPES.get(msg.dtype)
    if spec is None:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
        raise WireError(
            f"{field}.dtype",
            f"unsupported dtype {name}; expected FLOAT32, INT64, INT32 or BFLOAT16",
        )
    shape = [int(d) for d in msg.shape]
    if len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
        raise WireError(
            f"{field}.shape", f"bad shape {shape}: at most {_MAX_NDIM} dimensions, none negative"
        )
    encoding = msg.WhichOneof("encoding")
    if encoding == "dense":
        values = _widen(_frombuffer(msg.dense, spec.wire, f"{field}.data"), spec, f"{field}.data")
        if not shape:
            # An absent shape reads as []: like JSON without "shape", a 1-D tensor.
            shape = [values.size]
        if math.prod(shape) != values.size:
            raise WireError(
                f"{field}.shape",
                f"shape {shape} holds {math.prod(shape)} elements but data has {values.size}",
            )
        try:
            array = values.reshape(shape)
        except ValueError:  # e.g. [0, 2**62]: no elements, yet too big for numpy
            raise WireError(f"{field}.shape", f"bad shape {shape}") from None
    elif encoding == "sparse_csr":
        array = _densify_csr(msg.sparse_csr, spec, shape, field, budget)
    else:
        raise WireError(f"{field}.data", "required field is missing (neither dense nor sparse_csr)")
    return tinker.TensorData(data=array, dtype=spec.name, shape=shape)


def _densify_csr(
    msg: pb.SparseCsr, spec: _Dtype, shape: list[int], field: str, budget: _Budget
) -> npt.NDArray[Any]:
    """Fill a dense rows × cols array with zeros and the stored values, after checking
    every index, so a malformed tensor can neither crash nor write out of place."""
    if len(shape) != 2:
        raise WireError(f"{field}.shape", f"CSR tensors are 2-D, got shape {shape}")
    rows, cols = shape
    values = _widen(_frombuffer(msg.values, spec.wire, f"{field}.data"), spec, f"{field}.data")
    crow_field = f"{field}.sparse_crow_indices"
    col_field = f"{field}.sparse_col_indices"
    crow = _frombuffer(msg.crow_indices, _I64, crow_field)
    col = _frombuffer(msg.col_indices, _I64, col_field)
    if crow.size != rows + 1:
        raise WireError(crow_field, f"expected {rows + 1} row pointers, got {crow.size}")
    if col.size != values.size:
        raise WireError(col_field, f"{col.size} column indices for {values.size} values")
    counts = np.diff(crow)
    if int(crow[0]) != 0 or int(crow[-1]) != values.size:
        raise WireError(crow_field, f"must start at 0 and end at the value count {values.size}")
    if (counts < 0).any():
        raise WireError(crow_field, "row pointers must not decrease")
    bad = np.flatnonzero((col < 0) | (col >= cols))
    if bad.size:
        at = int(bad[0])
        raise WireError(f"{col_field}[{at}]", f"column {int(col[at])} is out of range")
    row_of = np.repeat(np.arange(rows, dtype=np.int64), counts)
    # Strictly increasing columns within a row: no entry is stored twice (torch's CSR
    # invariant, which tinker's own densification checks too).
    if ((row_of[1:] == row_of[:-1]) & (col[1:] <= col[:-1])).any():
        raise WireError(col_field, "columns must strictly increase within each row")
    budget.take(rows * cols, field)
    dense = np.zeros((rows, cols), dtype=spec.out)
    dense[row_of, col] = values
    return dense
