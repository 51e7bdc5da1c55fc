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

Numbers on the wire:

* ``int64`` tensors and token lists travel as JSON integers.
* ``float32`` tensors travel, in v1, as the exact float64 value of each float32
  (``0.10000000149011612``); with ``comms: "v2"`` the reference client writes long
  float32 tensors as the shortest decimal that identifies each float32 (``0.1``).
  Decoding parses to float64 and narrows to float32 with `_narrow_to_float32`, which
  corrects the rare double-rounding case (see there), so both forms decode bit-exactly.

tinker 0.38 compatibility: tinker's SDK reads ``SampleResponse`` and
``ForwardBackwardOutput`` results only as protobuf; `encode_sample_response_proto` and
`encode_forward_backward_output_proto` write those messages with tinker's own generated
message classes (imported lazily). Its protobuf ``forward_backward`` requests are read by
`firetitan.local.tinker_wire`; everything else tinker sends is JSON and goes through
`decode_request`.
"""

from __future__ import annotations

import array as stdarray
import base64
import binascii
import importlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs
import numpy as np
import numpy.typing as npt
import orjson
import tinker
from tinker.types import DmelChunk, ImageAssetPointerChunk, ImageChunk, PromptAltTokens
from tinker.types.topk_logprobs import TopkLogprobs

__all__ = [
    "MAX_DENSE_ELEMENTS",
    "METRIC_REDUCTIONS",
    "CompleteMetadata",
    "CreateModelRequest",
    "CreateSamplingSessionRequest",
    "CreateSessionRequest",
    "ForwardRequest",
    "FutureAck",
    "FutureFailed",
    "FutureOutcome",
    "FutureResult",
    "LoadWeightsRequest",
    "OptimStepRequest",
    "Request",
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
    "decode_forward_backward_output_proto",
    "decode_future_ack",
    "decode_future_outcome",
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
    "loads",
    "validate_metric_keys",
]

JSON = dict[str, Any]

#: Metric reductions a ``name:reduction`` key may name (§6.6).
METRIC_REDUCTIONS: Final = frozenset(
    {"sum", "mean", "slack", "min", "max", "hash_unordered", "unique"}
)

#: Most elements that sparse (CSR) tensors of one decoded body may expand to. Dense
#: tensors need no such limit: their shape must match the values actually sent.
MAX_DENSE_ELEMENTS: Final = 1 << 26

_MAX_NDIM: Final = 16
_MAX_TOKEN_ID: Final = 2**31 - 1  # token ids travel as int32 in tinker's protobuf
_INT64_MAX: Final = 2**63 - 1
_MAX_NUM_SAMPLES: Final = 1 << 16
_MAX_LORA_RANK: Final = 1 << 16  # also bounds projection_head_dim
_V2_MIN_ELEMENTS: Final = 256  # the reference client shortens only tensors this long
_MAX_ERROR_CLASS_BYTES: Final = 128
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
_TOPK_MASK_LOGPROB: Final = -99999.0

_CHECKPOINT_TYPES: Final = ("base", "delta", "merged_base")
_EXPORT_PRECISIONS: Final = ("source", "bf16", "nvfp4", "mxfp8", "fp8_block128")
_GRAD_ACC_NORMALIZATIONS: Final = ("none", "num_loss_tokens", "num_sequences")
_GRAD_NORM_MODES: Final = ("off", "basic", "detailed")
_ERROR_CATEGORIES: Final = ("user", "server", "unknown")
_STOP_REASONS: Final = ("stop", "length")


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
    try:
        out = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:  # orjson.JSONEncodeError derives from TypeError
        raise WireError("", f"cannot serialise as JSON: {exc}") from exc
    # orjson writes NaN and infinities as null. A body without any "null" therefore
    # holds only finite numbers; only otherwise is the object walked to tell a
    # non-finite number from a genuine None.
    if _has_null(out):
        bad = _find_non_finite(obj, "")
        if bad is not None:
            raise WireError(bad, "non-finite number (NaN or infinity) cannot be sent as JSON")
    return out


_NULL_SCAN_BYTES: Final = 64 * 1024
_N, _U = ord("n"), ord("u")


def _has_null(out: bytes) -> bool:
    """Whether ``out`` contains ``null``.

    For large bodies, numpy finds the candidate positions (an ``n`` followed by a
    ``u``) several times faster than ``bytes.__contains__`` scans for the word.
    """
    if len(out) < _NULL_SCAN_BYTES:
        return b"null" in out
    raw = np.frombuffer(out, dtype=np.uint8)
    candidates = np.flatnonzero((raw[:-3] == _N) & (raw[1:-2] == _U))
    return any(out.startswith(b"null", int(i)) for i in candidates)


def loads(data: bytes | str) -> Any:
    """Parse a JSON body.

    Raises:
        WireError: The body is not valid JSON (field ``""``).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireError("", f"malformed JSON: {exc}") from exc


def _find_non_finite(obj: Any, path: str) -> str | None:
    """Path of the first NaN/infinity in ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _find_non_finite(value, _key(path, str(key)))
            if found is not None:
                return found
        return None
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            found = _find_non_finite(value, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fc":
            bad = np.flatnonzero(~np.isfinite(obj.reshape(-1)))
            if bad.size:
                return f"{path}[{int(bad[0])}]"
        return None
    if isinstance(obj, np.floating):
        return None if bool(np.isfinite(obj)) else path
    return None


# --------------------------------------------------------------------------- field helpers


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _obj(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(field, f"expected a JSON object, got {_type_name(value)}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(field, f"expected an array, got {_type_name(value)}")
    return value


def _required(obj: Mapping[str, Any], key: str, path: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise WireError(_key(path, key), "required field is missing")
    return value


def _str(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise WireError(field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value:
        raise WireError(field, "must not be empty")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    return None if value is None else _str(value, _key(path, key))


def _int(value: Any, field: str, *, lo: int | None = None, hi: int = _INT64_MAX) -> int:
    # bool is an int subclass in Python; JSON true is never an integer here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(field, f"expected an integer, got {_type_name(value)}")
    if lo is not None and value < lo:
        raise WireError(field, f"must be >= {lo}, got {value}")
    if value > hi:
        raise WireError(field, f"must be <= {hi}, got {value}")
    return value


def _opt_int(
    obj: Mapping[str, Any], key: str, path: str, *, lo: int | None = None, hi: int = _INT64_MAX
) -> int | None:
    value = obj.get(key)
    return None if value is None else _int(value, _key(path, key), lo=lo, hi=hi)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(field, f"expected a boolean, got {_type_name(value)}")
    return value


def _opt_bool(obj: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = obj.get(key)
    return default if value is None else _bool(value, _key(path, key))


def _float(
    value: Any,
    field: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WireError(field, f"expected a number, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError as exc:
        raise WireError(field, "number out of range") from exc
    if not math.isfinite(number):
        raise WireError(field, "must be a finite number")
    if lo is not None and (number < lo or (lo_open and number == lo)):
        raise WireError(field, f"must be {'>' if lo_open else '>='} {lo}, got {number}")
    if hi is not None and (number > hi or (hi_open and number == hi)):
        raise WireError(field, f"must be {'<' if hi_open else '<='} {hi}, got {number}")
    return number


def _str_dict(value: Any, field: str) -> dict[str, str]:
    obj = _obj(value, field)
    for key, item in obj.items():
        _str(item, _key(field, key), allow_empty=True)
    return dict(obj)


def _check_type(obj: Mapping[str, Any], expected: str, path: str) -> None:
    """A ``"type"`` discriminator, where present, must name the expected body."""
    value = obj.get("type")
    if value is not None and value != expected:
        raise WireError(_key(path, "type"), f"expected {expected!r}, got {value!r}")


def _metric_value(value: Any, field: str) -> float:
    if isinstance(value, np.generic):
        value = value.item()
    return _float(value, field)


# --------------------------------------------------------------------------- numbers


def _narrow_to_float32(wide: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Round parsed float64 values to float32, as a direct decimal-to-float32 parse would.

    The JSON parser rounds each decimal to the nearest float64; rounding that again to
    float32 (ties to even) usually equals rounding the decimal straight to float32.
    It differs only when the float64 lands exactly on the midpoint between two
    neighbouring float32 values while the decimal itself was not on it: the tie then
    breaks to even instead of towards the side the decimal was on. Shortest float32
    decimals (v2, §6.4) do hit this: ``7.038531e-26`` is the shortest decimal of the
    float32 ``0x15ae43fd``, lies just below a midpoint, parses to the midpoint exactly,
    and would narrow to ``0x15ae43fe``. An exhaustive check of every finite float32
    (shortest decimal as orjson writes it, parsed by orjson) finds this value and its
    negative as the only ones; with the correction below all of them decode exactly.

    Values that are exact float32s (v1) never sit on a midpoint. For a value that does,
    the decimal was the shortest decimal of one of the two neighbours, so the neighbour
    whose shortest decimal parses to this very float64 is taken. If neither does (the
    sender wrote some other decimal), the float64 was an exact tie and either neighbour
    is correctly rounded; ties-to-even is kept. Only midpoint values take the slow path.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        narrow = wide.astype(np.float32)  # out-of-range values become inf, refused by callers
        mismatch = narrow.astype(np.float64) != wide
    # any() first: a reduction costs far less than flatnonzero when all are exact (v1).
    if not mismatch.any():
        return narrow
    inexact = np.flatnonzero(mismatch)
    values = wide[inexact]
    nearest = narrow[inexact]
    toward = np.where(values > nearest.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
    with np.errstate(over="ignore", invalid="ignore"):
        neighbour = np.nextafter(nearest, toward)
        midpoint = (nearest.astype(np.float64) + neighbour.astype(np.float64)) * 0.5
    on_midpoint = np.flatnonzero((midpoint == values) & np.isfinite(neighbour))
    if on_midpoint.size == 0:
        return narrow
    tied = values[on_midpoint]
    kept = nearest[on_midpoint]
    other = neighbour[on_midpoint]
    kept_text = np.asarray(orjson.loads(dumps(kept)), dtype=np.float64)
    other_text = np.asarray(orjson.loads(dumps(other)), dtype=np.float64)
    switch = (other_text == tied) & (kept_text != tied)
    narrow[inexact[on_midpoint[switch]]] = other[switch]
    return narrow


def _first_bad_index(values: list[Any], allowed: tuple[type, ...]) -> int:
    # Only called once a check has failed, to name the element.
    for i, item in enumerate(values):
        if type(item) not in allowed:
            return i
    return 0


def _int_array(values: Any, field: str, *, what: str = "integers") -> npt.NDArray[np.int64]:
    items = _list(values, field)
    kinds = set(map(type, items))
    if not kinds <= {int}:
        i = _first_bad_index(items, (int,))
        raise WireError(f"{field}[{i}]", f"expected {what}, got {_type_name(items[i])}")
    try:
        return np.array(items, dtype=np.int64)
    except OverflowError as exc:
        raise WireError(field, "integer out of the int64 range") from exc


def _exact_float32(items: list[Any]) -> npt.NDArray[np.float32] | None:
    """``items`` as float32 if every one is exactly a finite float32 value, else None.

    The common case for small tensors (v1 writes every float32 exactly; v2 shortens
    only long tensors). It uses C-level builtins rather than the dozen numpy calls of
    the general path, each of which costs microseconds when a request's handling has
    evicted numpy from the CPU caches. Exact values need no double-rounding repair.
    """
    try:
        single = stdarray.array("f", items)  # rounds to float32; out of range gives inf
    except OverflowError:  # an int beyond the float range
        return None
    # Equal means nothing was rounded (inf passes, NaN fails); sum() is then finite
    # exactly when every value is, since float32-range values cannot overflow a double
    # sum of this length.
    if single.tolist() != items or not math.isfinite(sum(items)):
        return None
    return np.array(single, dtype=np.float32)


def _float32_array(values: Any, field: str) -> npt.NDArray[np.float32]:
    items = _list(values, field)
    kinds = set(map(type, items))
    if not kinds <= {int, float}:
        i = _first_bad_index(items, (int, float))
        raise WireError(f"{field}[{i}]", f"expected numbers, got {_type_name(items[i])}")
    if len(items) < _V2_MIN_ELEMENTS:
        exact = _exact_float32(items)
        if exact is not None:
            return exact
    try:
        wide = np.array(items, dtype=np.float64)
    except OverflowError as exc:
        raise WireError(field, "number out of the float32 range") from exc
    narrow = _narrow_to_float32(wide)
    finite = np.isfinite(narrow)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        reason = "number out of the float32 range" if np.isfinite(wide[i]) else "non-finite"
        raise WireError(f"{field}[{i}]", reason)
    return narrow


def _token_ids(values: Any, field: str) -> list[int]:
    array = _int_array(values, field, what="integer token ids")
    if array.size:
        bad = np.flatnonzero((array < 0) | (array > _MAX_TOKEN_ID))
        if bad.size:
            i = int(bad[0])
            raise WireError(f"{field}[{i}]", f"token id {int(array[i])} is out of range")
    items: list[int] = values  # validated: a list of in-range Python ints
    return items


# --------------------------------------------------------------------------- tensors


class _Budget:
    """How many more elements sparse tensors of one body may expand to."""

    def __init__(self, elements: int = MAX_DENSE_ELEMENTS) -> None:
        self.remaining = elements

    def take(self, elements: int, field: str) -> None:
        if elements > self.remaining:
            raise WireError(
                field, f"sparse tensor expands to {elements} elements, over the body's limit"
            )
        self.remaining -= elements


def _shape(value: Any, field: str) -> list[int]:
    dims = _list(value, field)
    if len(dims) > _MAX_NDIM:
        raise WireError(field, f"at most {_MAX_NDIM} dimensions are supported")
    return [_int(d, f"{field}[{i}]", lo=0) for i, d in enumerate(dims)]


def _values(obj: Mapping[str, Any], dtype: str, field: str) -> npt.NDArray[Any]:
    raw = obj.get("data")
    if raw is None:
        raise WireError(_key(field, "data"), "required field is missing")
    if dtype == "int64":
        return _int_array(raw, _key(field, "data"))
    return _float32_array(raw, _key(field, "data"))


def _decode_tensor(obj: Any, field: str, budget: _Budget, *, pad: int = 0) -> tinker.TensorData:
    tensor = _obj(obj, field)
    dtype = tensor.get("dtype")
    if dtype not in ("int64", "float32"):
        raise WireError(_key(field, "dtype"), f"expected 'int64' or 'float32', got {dtype!r}")
    crow_raw = tensor.get("sparse_crow_indices")
    col_raw = tensor.get("sparse_col_indices")
    values = _values(tensor, dtype, field)
    if crow_raw is None and col_raw is None:
        shape_raw = tensor.get("shape")
        size = values.size
        if shape_raw is None or (
            # The usual 1-D case, checked without building field paths or reshaping.
            type(shape_raw) is list
            and len(shape_raw) == 1
            and type(shape_raw[0]) is int
            and shape_raw[0] == size
        ):
            return tinker.TensorData(data=values, dtype=dtype, shape=[size])
        shape = _shape(shape_raw, _key(field, "shape"))
        if math.prod(shape) != values.size:
            raise WireError(
                _key(field, "shape"),
                f"shape {shape} holds {math.prod(shape)} elements but data has {values.size}",
            )
        return tinker.TensorData(data=values.reshape(shape), dtype=dtype, shape=shape)
    if crow_raw is None or col_raw is None:
        missing = "sparse_col_indices" if col_raw is None else "sparse_crow_indices"
        raise WireError(_key(field, missing), "CSR tensors need both index arrays")
    dense = _densify_csr(
        values,
        _int_array(crow_raw, _key(field, "sparse_crow_indices")),
        _int_array(col_raw, _key(field, "sparse_col_indices")),
        _shape(_required(tensor, "shape", field), _key(field, "shape")),
        field,
        budget,
        pad,
    )
    return tinker.TensorData(data=dense, dtype=dtype, shape=list(dense.shape))


def _densify_csr(
    values: npt.NDArray[Any],
    crow: npt.NDArray[np.int64],
    col: npt.NDArray[np.int64],
    shape: list[int],
    field: str,
    budget: _Budget,
    pad: int = 0,
) -> npt.NDArray[Any]:
    """Validate CSR indices and expand them to a dense 2-D array (``pad`` elsewhere)."""
    if len(shape) != 2:
        raise WireError(_key(field, "shape"), f"CSR tensors are 2-D, got shape {shape}")
    rows, cols = shape
    crow_field = _key(field, "sparse_crow_indices")
    col_field = _key(field, "sparse_col_indices")
    if crow.size != rows + 1:
        raise WireError(crow_field, f"expected {rows + 1} row pointers, got {crow.size}")
    if col.size != values.size:
        raise WireError(col_field, f"{col.size} column indices for {values.size} values")
    if crow[0] != 0 or crow[-1] != values.size:
        raise WireError(crow_field, f"must start at 0 and end at the value count {values.size}")
    per_row = np.diff(crow)
    if per_row.size and per_row.min() < 0:
        raise WireError(crow_field, "row pointers must not decrease")
    if col.size:
        bad = np.flatnonzero((col < 0) | (col >= cols))
        if bad.size:
            i = int(bad[0])
            raise WireError(f"{col_field}[{i}]", f"column {int(col[i])} is out of range")
    row_of = np.repeat(np.arange(rows, dtype=np.int64), per_row)
    # Within a row, columns must strictly increase (no duplicates), as torch requires.
    if np.any((row_of[1:] == row_of[:-1]) & (col[1:] <= col[:-1])):
        raise WireError(col_field, "columns must strictly increase within each row")
    budget.take(rows * cols, field)
    dense = np.full((rows, cols), pad, dtype=values.dtype)
    dense[row_of, col] = values
    return dense


def decode_tensor(obj: Any, field: str = "tensor") -> tinker.TensorData:
    """Decode a wire tensor (dense or CSR, densified with zeros) into a dense
    `tinker.TensorData` backed by a numpy array of the declared dtype.

    Raises:
        WireError: Wrong dtype, a shape that does not match the data length, bad CSR
            indices, a non-finite value, or a value that does not fit the dtype.
    """
    return _decode_tensor(obj, field, _Budget())


def _stored_values(tensor: tinker.TensorData) -> npt.NDArray[Any]:
    """The flat values a TensorData holds (the listed values of a CSR tensor)."""
    array = getattr(tensor, "_numpy", None)
    if isinstance(array, np.ndarray):
        return array.reshape(-1)
    return np.asarray(tensor.data).reshape(-1)


def _wire_values(flat: npt.NDArray[Any], dtype: str, *, v2: bool) -> npt.NDArray[Any]:
    if dtype == "int64":
        return np.ascontiguousarray(flat, dtype=np.int64)
    narrow = np.ascontiguousarray(flat, dtype=np.float32)
    # v2 rule of the reference client: only long tensors of finite values below the
    # float32 maximum are shortened (older trainers compare the parsed decimal of the
    # extremes with the exact maximum). orjson writes float32 arrays as shortest
    # float32 decimals and float64 arrays as shortest float64 decimals, i.e. the exact
    # value of each widened float32.
    if v2 and narrow.size >= _V2_MIN_ELEMENTS:
        with np.errstate(invalid="ignore"):
            if np.isfinite(narrow).all() and float(np.abs(narrow).max()) < _FLOAT32_MAX:
                return narrow
    return narrow.astype(np.float64)


def _check_dtype(tensor: tinker.TensorData, field: str) -> str:
    dtype = str(tensor.dtype)
    if dtype not in ("int64", "float32"):
        raise WireError(_key(field, "dtype"), f"expected 'int64' or 'float32', got {dtype!r}")
    return dtype


def encode_tensor(tensor: tinker.TensorData, *, v2: bool = False) -> JSON:
    """Encode a `tinker.TensorData` (dense or CSR) as wire.md §6.2 describes.

    With ``v2``, float32 data is written as shortest float32 decimals (§6.4);
    otherwise float32 values are widened to the exact float64 value. As the reference
    client does, v2 shortens only tensors of at least 256 finite values below the
    float32 maximum, and ``shape`` is sent only when the tensor has one.

    Raises:
        WireError: The dtype is not ``int64`` or ``float32``.
    """
    dtype = _check_dtype(tensor, "tensor")
    if tensor.sparse_crow_indices is not None:
        if tensor.sparse_col_indices is None or tensor.shape is None:
            raise WireError("tensor", "CSR tensors need sparse_col_indices and shape")
        return {
            "data": _wire_values(_stored_values(tensor), dtype, v2=v2),
            "dtype": dtype,
            "shape": [int(d) for d in tensor.shape],
            "sparse_crow_indices": np.asarray(tensor.sparse_crow_indices, dtype=np.int64),
            "sparse_col_indices": np.asarray(tensor.sparse_col_indices, dtype=np.int64),
        }
    out: JSON = {"data": _wire_values(tensor.to_numpy().reshape(-1), dtype, v2=v2), "dtype": dtype}
    if tensor.shape is not None:
        out["shape"] = [int(d) for d in tensor.shape]
    return out


def _dense_numpy(tensor: tinker.TensorData, field: str) -> npt.NDArray[Any]:
    """A dense numpy array for any TensorData (CSR expanded with zeros, without torch)."""
    dtype = _check_dtype(tensor, field)
    np_dtype = np.int64 if dtype == "int64" else np.float32
    if tensor.sparse_crow_indices is None:
        return np.asarray(tensor.to_numpy(), dtype=np_dtype)
    if tensor.sparse_col_indices is None or tensor.shape is None:
        raise WireError(field, "CSR tensors need sparse_col_indices and shape")
    return _densify_csr(
        np.asarray(_stored_values(tensor), dtype=np_dtype),
        np.asarray(tensor.sparse_crow_indices, dtype=np.int64),
        np.asarray(tensor.sparse_col_indices, dtype=np.int64),
        [int(d) for d in tensor.shape],
        field,
        _Budget(),
    )


# --------------------------------------------------------------------------- model input


def encode_model_input(model_input: tinker.ModelInput) -> JSON:
    """Encode a `tinker.ModelInput` (``encoded_text`` and ``image`` chunks).

    Raises:
        WireError: A chunk type the JSON wire does not carry (audio, asset pointers).
    """
    chunks: list[JSON] = []
    for i, chunk in enumerate(model_input.chunks):
        if isinstance(chunk, tinker.EncodedTextChunk):
            tokens: Any = chunk.tokens
            if not isinstance(tokens, list | tuple):
                tokens = np.ascontiguousarray(tokens, dtype=np.int64)
            chunks.append({"tokens": tokens, "type": "encoded_text"})
        elif isinstance(chunk, ImageChunk):
            image: JSON = {
                "data": base64.b64encode(chunk.data).decode("ascii"),
                "format": chunk.format,
            }
            if chunk.expected_tokens is not None:
                image["expected_tokens"] = chunk.expected_tokens
            image["type"] = "image"
            chunks.append(image)
        else:
            raise WireError(
                f"model_input.chunks[{i}].type",
                f"chunk type {getattr(chunk, 'type', type(chunk).__name__)!r} is not supported",
            )
    return {"chunks": chunks}


def decode_model_input(obj: Any, field: str = "model_input") -> tinker.ModelInput:
    """Decode a ModelInput.

    Raises:
        WireError: Unknown chunk type, non-integer or negative token ids, bad image data.
    """
    model_input = _obj(obj, field)
    raw_chunks = _list(_required(model_input, "chunks", field), _key(field, "chunks"))
    chunks: list[tinker.EncodedTextChunk | ImageChunk] = []
    for i, raw in enumerate(raw_chunks):
        path = f"{field}.chunks[{i}]"
        chunk = _obj(raw, path)
        kind = chunk.get("type", "encoded_text" if "tokens" in chunk else None)
        if kind == "encoded_text":
            tokens = _token_ids(_required(chunk, "tokens", path), _key(path, "tokens"))
            # Validated above; skipping pydantic's per-token validation keeps this O(1)
            # in Python for long sequences.
            chunks.append(tinker.EncodedTextChunk.model_construct(tokens=tokens, type=kind))
        elif kind == "image":
            chunks.append(_decode_image(chunk, path))
        else:
            raise WireError(
                _key(path, "type"), f"unknown chunk type {kind!r}; expected encoded_text or image"
            )
    return tinker.ModelInput.model_construct(chunks=chunks)


def _decode_image(chunk: Mapping[str, Any], path: str) -> ImageChunk:
    data_field = _key(path, "data")
    text = _str(_required(chunk, "data", path), data_field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireError(data_field, "not valid base64") from exc
    fmt = chunk.get("format")
    if fmt not in ("png", "jpeg"):
        raise WireError(_key(path, "format"), f"expected 'png' or 'jpeg', got {fmt!r}")
    expected = _opt_int(chunk, "expected_tokens", path, lo=0)
    return ImageChunk(data=data, format=fmt, expected_tokens=expected)


# --------------------------------------------------------------------------- datum


def encode_datum(datum: tinker.Datum, *, v2: bool = False) -> JSON:
    """Encode a `tinker.Datum`.

    Raises:
        WireError: As for `encode_tensor` and `encode_model_input`.
    """
    return {
        "loss_fn_inputs": {
            name: encode_tensor(tensor, v2=v2) for name, tensor in datum.loss_fn_inputs.items()
        },
        "model_input": encode_model_input(datum.model_input),
    }


def _decode_datum(obj: Any, field: str, budget: _Budget) -> tinker.Datum:
    datum = _obj(obj, field)
    model_input = decode_model_input(
        _required(datum, "model_input", field), _key(field, "model_input")
    )
    inputs_field = _key(field, "loss_fn_inputs")
    raw_inputs = datum.get("loss_fn_inputs")
    inputs: dict[str, tinker.TensorData] = {}
    if raw_inputs is not None:
        for name, raw in _obj(raw_inputs, inputs_field).items():
            inputs[name] = _decode_tensor(raw, _key(inputs_field, name), budget)
    return tinker.Datum(model_input=model_input, loss_fn_inputs=inputs)


def decode_datum(obj: Any, field: str = "datum") -> tinker.Datum:
    """Decode a Datum.

    Raises:
        WireError: As for `decode_model_input` and `decode_tensor`.
    """
    return _decode_datum(obj, field, _Budget())


# --------------------------------------------------------------------------- requests


@attrs.frozen(kw_only=True)
class CreateSessionRequest:
    """``POST /api/v1/create_session`` (§3.2)."""

    tags: list[str] = attrs.field(factory=list)
    user_metadata: dict[str, str] = attrs.field(factory=dict)
    sdk_version: str = "0.23.0"


@attrs.frozen(kw_only=True)
class CreateModelRequest:
    """``POST /api/v1/create_model`` (§3.7). ``lora_rank == 0`` is full-parameter.

    ``lora_alpha`` and ``lora_init_method`` apply to LoRA only and are not sent for
    full-parameter models. ``base_only`` creates a frozen reference model; its body
    carries no ``lora_config``.
    """

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
    lora_init_method: str | None = None
    projection_head_dim: int | None = None


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
    """``POST /api/v1/optim_step`` (§3.11).

    ``emit_grad_norm_metrics`` (``"off"``, ``"basic"``, ``"detailed"`` or a bool) travels
    inside ``adam_params``, as the Fireworks client sends it.
    """

    model_id: str
    seq_id: int
    adam_params: tinker.AdamParams
    grad_accumulation_normalization: str | None = None
    emit_grad_norm_metrics: str | bool | None = None


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
    """``POST /api/v1/load_weights`` (§3.13). ``optimizer`` restores Adam state too.

    Two forms: an ordinary load into ``model_id`` at ``seq_id``; or tinker's
    create-via-load (§12.1), which has no ``model_id``/``seq_id`` but ``session_id`` and
    ``model_seq_id`` (plus optional ``base_model`` and ``user_metadata``) and creates the
    model ``"<session_id>:train:<model_seq_id>"`` from the checkpoint.
    """

    model_id: str | None = None
    seq_id: int | None = None
    path: str
    optimizer: bool = False
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, str] | None = None

    def __attrs_post_init__(self) -> None:
        ordinary = self.model_id is not None and self.seq_id is not None
        create = self.session_id is not None and self.model_seq_id is not None
        if ordinary == create:
            raise ValueError(
                "LoadWeightsRequest needs either model_id and seq_id, or (to create the "
                "model) session_id and model_seq_id"
            )

    @property
    def creates_model(self) -> bool:
        """Whether this is tinker's create-via-load form."""
        return self.model_id is None

    @property
    def target_model_id(self) -> str:
        """The model the load goes into (derived for create-via-load)."""
        if self.model_id is not None:
            return self.model_id
        return f"{self.session_id}:train:{self.model_seq_id}"


@attrs.frozen(kw_only=True)
class SaveWeightsForSamplerRequest:
    """``POST /api/v1/save_weights_for_sampler`` (§3.14).

    ``export_precision`` (``merged_base`` only) and ``metadata`` are Fireworks extensions.
    """

    model_id: str
    seq_id: int
    path: str | None = None
    checkpoint_type: str | None = None
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None
    export_precision: str | None = None
    metadata: Mapping[str, Any] | None = None


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
    """``POST /api/v1/asample`` (tinker sampling).

    ``target_prompt_logprobs`` is decoded dense, with ``-1`` ("nothing requested") in
    cells a sparse request leaves out.
    """

    prompt: tinker.ModelInput
    num_samples: int
    sampling_params: tinker.SamplingParams
    model_path: str | None = None
    base_model: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: tinker.TensorData | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool = False


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


def _enum_value(value: Any) -> Any:
    """The plain value of a str enum (e.g. `GradAccNormalization`), else the value."""
    return getattr(value, "value", value)


def _encode_create_session(r: CreateSessionRequest) -> JSON:
    return {
        "tags": list(r.tags),
        "user_metadata": dict(r.user_metadata),
        "sdk_version": r.sdk_version,
        "type": "create_session",
    }


def _encode_create_model(r: CreateModelRequest) -> JSON:
    body: JSON = {}
    if r.projection_head_dim:
        body["projection_head_dim"] = r.projection_head_dim
    body.update(session_id=r.session_id, model_seq_id=r.model_seq_id, base_model=r.base_model)
    if r.user_metadata is not None:
        body["user_metadata"] = dict(r.user_metadata)
    if not r.base_only:
        lora: JSON = {}
        if r.lora_rank > 0 and r.lora_alpha is not None:
            lora["alpha"] = r.lora_alpha
        if r.lora_rank > 0 and r.lora_init_method is not None:
            lora["init_method"] = r.lora_init_method
        lora["rank"] = r.lora_rank
        if r.lora_seed is not None:
            lora["seed"] = r.lora_seed
        lora.update(train_unembed=r.train_unembed, train_mlp=r.train_mlp, train_attn=r.train_attn)
        body["lora_config"] = lora
    body["type"] = "create_model"
    if r.base_only:
        body["base_only"] = True
    return body


def _encode_forward(r: ForwardRequest) -> JSON:
    v2 = r.comms == "v2"
    inner: JSON = {"data": [encode_datum(d, v2=v2) for d in r.data], "loss_fn": r.loss_fn}
    if r.loss_fn_config is not None:
        inner["loss_fn_config"] = dict(r.loss_fn_config)
    key = "forward_input" if r.forward_only else "forward_backward_input"
    body: JSON = {key: inner, "model_id": r.model_id, "seq_id": r.seq_id}
    if r.comms is not None:
        body["comms"] = r.comms
    return body


def _encode_optim_step(r: OptimStepRequest) -> JSON:
    p = r.adam_params
    adam: JSON = {}
    if r.emit_grad_norm_metrics is not None:
        adam["emit_grad_norm_metrics"] = _enum_value(r.emit_grad_norm_metrics)
    adam.update(
        learning_rate=float(p.learning_rate),
        beta1=float(p.beta1),
        beta2=float(p.beta2),
        eps=float(p.eps),
        weight_decay=float(p.weight_decay),
        grad_clip_norm=float(p.grad_clip_norm),
    )
    body: JSON = {"adam_params": adam, "model_id": r.model_id, "seq_id": r.seq_id}
    body["type"] = "optim_step"
    if r.grad_accumulation_normalization is not None:
        body["grad_accumulation_normalization"] = str(
            _enum_value(r.grad_accumulation_normalization)
        )
    return body


def _encode_save_weights(r: SaveWeightsRequest) -> JSON:
    body: JSON = {"model_id": r.model_id, "path": r.path, "seq_id": r.seq_id}
    if r.ttl_seconds is not None:
        body["ttl_seconds"] = r.ttl_seconds
    body.update(overwrite=r.overwrite, type="save_weights")
    return body


def _encode_load_weights(r: LoadWeightsRequest) -> JSON:
    if r.model_id is not None:
        return {
            "model_id": r.model_id,
            "path": r.path,
            "optimizer": r.optimizer,
            "seq_id": r.seq_id,
            "type": "load_weights",
        }
    body: JSON = {"session_id": r.session_id, "model_seq_id": r.model_seq_id}
    if r.base_model is not None:
        body["base_model"] = r.base_model
    if r.user_metadata is not None:
        body["user_metadata"] = dict(r.user_metadata)
    body.update(path=r.path, optimizer=r.optimizer, type="load_weights")
    return body


def _encode_save_for_sampler(r: SaveWeightsForSamplerRequest) -> JSON:
    body: JSON = {"model_id": r.model_id}
    if r.path is not None:
        body["path"] = r.path
    if r.sampling_session_seq_id is not None:
        body["sampling_session_seq_id"] = r.sampling_session_seq_id
    body["seq_id"] = r.seq_id
    if r.ttl_seconds is not None:
        body["ttl_seconds"] = r.ttl_seconds
    body["type"] = "save_weights_for_sampler"
    if r.checkpoint_type is not None:
        body["checkpoint_type"] = r.checkpoint_type
    if r.export_precision is not None:
        body["export_precision"] = r.export_precision
    if r.metadata is not None:
        body["metadata"] = dict(r.metadata)
    return body


def _encode_retrieve_future(r: RetrieveFutureRequest) -> JSON:
    return {"request_id": r.request_id, "allow_metadata_only": r.allow_metadata_only}


def _encode_create_sampling_session(r: CreateSamplingSessionRequest) -> JSON:
    body: JSON = {"session_id": r.session_id, "sampling_session_seq_id": r.sampling_session_seq_id}
    if r.base_model is not None:
        body["base_model"] = r.base_model
    if r.model_path is not None:
        body["model_path"] = r.model_path
    body["type"] = "create_sampling_session"
    return body


def _encode_sample(r: SampleRequest) -> JSON:
    body: JSON = {
        "num_samples": r.num_samples,
        "prompt": encode_model_input(r.prompt),
        "sampling_params": r.sampling_params.model_dump(mode="json", exclude_none=True),
    }
    optional: dict[str, Any] = {
        "base_model": r.base_model,
        "model_path": r.model_path,
        "sampling_session_id": r.sampling_session_id,
        "seq_id": r.seq_id,
    }
    body.update((k, v) for k, v in optional.items() if v is not None)
    body.update(
        prompt_logprobs=r.prompt_logprobs,
        topk_prompt_logprobs=r.topk_prompt_logprobs,
        topk_sample_logprobs=r.topk_sample_logprobs,
    )
    if r.target_prompt_logprobs is not None:
        body["target_prompt_logprobs"] = encode_tensor(r.target_prompt_logprobs)
    body["prompt_alt_tokens_k"] = r.prompt_alt_tokens_k
    if r.prompt_logprobs_last_n is not None:
        body["prompt_logprobs_last_n"] = r.prompt_logprobs_last_n
    body.update(record_stability_info=r.record_stability_info, type="sample")
    return body


_ENCODERS: Final[dict[type, Callable[[Any], JSON]]] = {
    CreateSessionRequest: _encode_create_session,
    CreateModelRequest: _encode_create_model,
    ForwardRequest: _encode_forward,
    OptimStepRequest: _encode_optim_step,
    SaveWeightsRequest: _encode_save_weights,
    LoadWeightsRequest: _encode_load_weights,
    SaveWeightsForSamplerRequest: _encode_save_for_sampler,
    RetrieveFutureRequest: _encode_retrieve_future,
    CreateSamplingSessionRequest: _encode_create_sampling_session,
    SampleRequest: _encode_sample,
}


def encode_request(request: Request) -> JSON:
    """Encode any request above as the body the reference client sends
    (including ``"type"`` discriminators where it sends them).

    Raises:
        TypeError: ``request`` is not one of the request classes.
        WireError: A tensor or chunk the wire cannot carry.
    """
    encoder = _ENCODERS.get(type(request))
    if encoder is None:
        raise TypeError(f"not a request: {type(request).__name__}")
    return encoder(request)


# --------------------------------------------------------------------------- request decoders


def _decode_create_session(body: dict[str, Any], _: _Budget) -> CreateSessionRequest:
    _check_type(body, "create_session", "")
    tags_raw = body.get("tags")
    tags = [] if tags_raw is None else _list(tags_raw, "tags")
    for i, tag in enumerate(tags):
        _str(tag, f"tags[{i}]", allow_empty=True)
    metadata_raw = body.get("user_metadata")
    metadata = {} if metadata_raw is None else _str_dict(metadata_raw, "user_metadata")
    version = body.get("sdk_version")
    return CreateSessionRequest(
        tags=list(tags),
        user_metadata=metadata,
        sdk_version="0.23.0" if version is None else _str(version, "sdk_version"),
    )


def _decode_create_model(body: dict[str, Any], _: _Budget) -> CreateModelRequest:
    _check_type(body, "create_model", "")
    session_id = _str(_required(body, "session_id", ""), "session_id")
    model_seq_id = _int(_required(body, "model_seq_id", ""), "model_seq_id", lo=0)
    base_model = _str(_required(body, "base_model", ""), "base_model")
    metadata_raw = body.get("user_metadata")
    metadata = None if metadata_raw is None else _str_dict(metadata_raw, "user_metadata")
    projection = _opt_int(body, "projection_head_dim", "", lo=0, hi=_MAX_LORA_RANK) or None
    base_only = _opt_bool(body, "base_only", "", False)
    lora_raw = body.get("lora_config")
    if base_only or lora_raw is None:
        # A missing lora_config is a full-parameter model (rank 0, everything trained).
        return CreateModelRequest(
            session_id=session_id,
            model_seq_id=model_seq_id,
            base_model=base_model,
            base_only=base_only,
            user_metadata=metadata,
            projection_head_dim=projection,
        )
    lora = _obj(lora_raw, "lora_config")
    rank = _int(_required(lora, "rank", "lora_config"), "lora_config.rank", lo=0, hi=_MAX_LORA_RANK)
    alpha = _opt_int(lora, "alpha", "lora_config", lo=1, hi=_INT64_MAX)
    init_method = _opt_str(lora, "init_method", "lora_config")
    return CreateModelRequest(
        session_id=session_id,
        model_seq_id=model_seq_id,
        base_model=base_model,
        lora_rank=rank,
        lora_alpha=alpha if rank > 0 else None,
        lora_seed=_opt_int(lora, "seed", "lora_config"),
        train_mlp=_opt_bool(lora, "train_mlp", "lora_config", True),
        train_attn=_opt_bool(lora, "train_attn", "lora_config", True),
        train_unembed=_opt_bool(lora, "train_unembed", "lora_config", True),
        user_metadata=metadata,
        lora_init_method=init_method if rank > 0 else None,
        projection_head_dim=projection,
    )


def _seq_id(body: Mapping[str, Any]) -> int:
    return _int(_required(body, "seq_id", ""), "seq_id", lo=1)


def _model_id(body: Mapping[str, Any]) -> str:
    return _str(_required(body, "model_id", ""), "model_id")


def _loss_fn_config(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    config = _obj(value, field)
    for key, item in config.items():
        if item is None or isinstance(item, str | bool):
            continue
        if isinstance(item, int | float):
            _float(item, _key(field, key))
            continue
        raise WireError(
            _key(field, key), f"expected a number, string or boolean, got {_type_name(item)}"
        )
    return dict(config)


def _decode_forward_like(
    body: dict[str, Any], budget: _Budget, *, forward_only: bool
) -> ForwardRequest:
    key = "forward_input" if forward_only else "forward_backward_input"
    inner = _obj(_required(body, key, ""), key)
    raw_data = _list(_required(inner, "data", key), _key(key, "data"))
    if not raw_data:
        raise WireError(_key(key, "data"), "must hold at least one datum")
    data = [_decode_datum(d, f"{key}.data[{i}]", budget) for i, d in enumerate(raw_data)]
    comms = body.get("comms")
    return ForwardRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        data=data,
        loss_fn=_str(_required(inner, "loss_fn", key), _key(key, "loss_fn")),
        loss_fn_config=_loss_fn_config(inner.get("loss_fn_config"), _key(key, "loss_fn_config")),
        forward_only=forward_only,
        comms=None if comms is None else _str(comms, "comms"),
    )


def _decode_forward(body: dict[str, Any], budget: _Budget) -> ForwardRequest:
    return _decode_forward_like(body, budget, forward_only=True)


def _decode_forward_backward(body: dict[str, Any], budget: _Budget) -> ForwardRequest:
    return _decode_forward_like(body, budget, forward_only=False)


def _decode_optim_step(body: dict[str, Any], _: _Budget) -> OptimStepRequest:
    _check_type(body, "optim_step", "")
    raw = body.get("adam_params")
    if raw is None:
        if body.get("optimizer_params") is not None:
            raise WireError("optimizer_params", "only Adam (adam_params) is supported")
        raise WireError("adam_params", "required field is missing")
    adam = _obj(raw, "adam_params")
    defaults = tinker.AdamParams()

    def number(name: str, **limits: Any) -> float:
        value = adam.get(name)
        if value is None:
            return float(getattr(defaults, name))
        return _float(value, f"adam_params.{name}", **limits)

    params = tinker.AdamParams(
        learning_rate=number("learning_rate", lo=0.0),
        beta1=number("beta1", lo=0.0, hi=1.0, hi_open=True),
        beta2=number("beta2", lo=0.0, hi=1.0, hi_open=True),
        eps=number("eps", lo=0.0),
        weight_decay=number("weight_decay", lo=0.0),
        grad_clip_norm=number("grad_clip_norm", lo=0.0),
    )
    grad_norm = adam.get("emit_grad_norm_metrics")
    if grad_norm is not None and not isinstance(grad_norm, bool):
        grad_norm = _str(grad_norm, "adam_params.emit_grad_norm_metrics").lower()
        if grad_norm not in _GRAD_NORM_MODES:
            raise WireError(
                "adam_params.emit_grad_norm_metrics",
                f"expected a boolean or one of {', '.join(_GRAD_NORM_MODES)}, got {grad_norm!r}",
            )
    norm = body.get("grad_accumulation_normalization")
    if norm is not None:
        norm = _str(norm, "grad_accumulation_normalization").lower()
        if norm not in _GRAD_ACC_NORMALIZATIONS:
            raise WireError(
                "grad_accumulation_normalization",
                f"expected one of {', '.join(_GRAD_ACC_NORMALIZATIONS)}, got {norm!r}",
            )
    return OptimStepRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        adam_params=params,
        grad_accumulation_normalization=norm,
        emit_grad_norm_metrics=grad_norm,
    )


def _decode_save_weights(body: dict[str, Any], _: _Budget) -> SaveWeightsRequest:
    _check_type(body, "save_weights", "")
    return SaveWeightsRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        path=_str(_required(body, "path", ""), "path"),
        overwrite=_opt_bool(body, "overwrite", "", False),
        ttl_seconds=_opt_int(body, "ttl_seconds", "", lo=1),
    )


def _decode_load_weights(body: dict[str, Any], _: _Budget) -> LoadWeightsRequest:
    _check_type(body, "load_weights", "")
    path = _str(_required(body, "path", ""), "path")
    optimizer = _bool(_required(body, "optimizer", ""), "optimizer")
    if body.get("model_id") is not None or body.get("session_id") is None:
        return LoadWeightsRequest(
            model_id=_model_id(body), seq_id=_seq_id(body), path=path, optimizer=optimizer
        )
    metadata_raw = body.get("user_metadata")
    return LoadWeightsRequest(
        path=path,
        optimizer=optimizer,
        session_id=_str(body["session_id"], "session_id"),
        model_seq_id=_int(_required(body, "model_seq_id", ""), "model_seq_id", lo=0),
        base_model=_opt_str(body, "base_model", ""),
        user_metadata=None if metadata_raw is None else _str_dict(metadata_raw, "user_metadata"),
    )


def _decode_save_for_sampler(body: dict[str, Any], _: _Budget) -> SaveWeightsForSamplerRequest:
    _check_type(body, "save_weights_for_sampler", "")
    checkpoint_type = _opt_str(body, "checkpoint_type", "")
    if checkpoint_type is not None:
        checkpoint_type = checkpoint_type.lower()
        if checkpoint_type not in _CHECKPOINT_TYPES:
            raise WireError(
                "checkpoint_type",
                f"expected one of {', '.join(_CHECKPOINT_TYPES)}, got {checkpoint_type!r}",
            )
    precision = _opt_str(body, "export_precision", "")
    if precision is not None:
        precision = precision.lower()
        if precision not in _EXPORT_PRECISIONS:
            raise WireError(
                "export_precision",
                f"expected one of {', '.join(_EXPORT_PRECISIONS)}, got {precision!r}",
            )
        if checkpoint_type != "merged_base":
            raise WireError("export_precision", "only allowed with checkpoint_type 'merged_base'")
    metadata_raw = body.get("metadata")
    return SaveWeightsForSamplerRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        path=_opt_str(body, "path", ""),
        checkpoint_type=checkpoint_type,
        ttl_seconds=_opt_int(body, "ttl_seconds", "", lo=1),
        sampling_session_seq_id=_opt_int(body, "sampling_session_seq_id", "", lo=0),
        export_precision=precision,
        metadata=None if metadata_raw is None else dict(_obj(metadata_raw, "metadata")),
    )


def _decode_retrieve_future(body: dict[str, Any], _: _Budget) -> RetrieveFutureRequest:
    return RetrieveFutureRequest(
        request_id=_str(_required(body, "request_id", ""), "request_id"),
        allow_metadata_only=_opt_bool(body, "allow_metadata_only", "", False),
    )


def _decode_create_sampling_session(
    body: dict[str, Any], _: _Budget
) -> CreateSamplingSessionRequest:
    _check_type(body, "create_sampling_session", "")
    return CreateSamplingSessionRequest(
        session_id=_str(_required(body, "session_id", ""), "session_id"),
        sampling_session_seq_id=_int(
            _required(body, "sampling_session_seq_id", ""), "sampling_session_seq_id", lo=0
        ),
        base_model=_opt_str(body, "base_model", ""),
        model_path=_opt_str(body, "model_path", ""),
    )


def _decode_sampling_params(value: Any, field: str) -> tinker.SamplingParams:
    params = _obj(value, field)
    stop_raw = params.get("stop")
    stop: str | list[str] | list[int] | None
    if stop_raw is None or isinstance(stop_raw, str):
        stop = stop_raw
    else:
        items = _list(stop_raw, _key(field, "stop"))
        if all(isinstance(s, str) for s in items):
            stop = list(items)
        else:
            stop = _token_ids(items, _key(field, "stop"))
    temperature = params.get("temperature")
    top_p = params.get("top_p")
    top_k = params.get("top_k")
    return tinker.SamplingParams(
        max_tokens=_opt_int(params, "max_tokens", field, lo=0),
        seed=_opt_int(params, "seed", field),
        stop=stop,
        temperature=1.0
        if temperature is None
        else _float(temperature, f"{field}.temperature", lo=0.0),
        top_k=-1 if top_k is None else _int(top_k, f"{field}.top_k", lo=-1),
        top_p=1.0
        if top_p is None
        else _float(top_p, f"{field}.top_p", lo=0.0, hi=1.0, lo_open=True),
    )


def _decode_sample(body: dict[str, Any], budget: _Budget) -> SampleRequest:
    _check_type(body, "sample", "")
    num_samples = body.get("num_samples")
    target_raw = body.get("target_prompt_logprobs")
    target = None
    if target_raw is not None:
        target = _decode_tensor(target_raw, "target_prompt_logprobs", budget, pad=-1)
        if target.dtype != "int64" or target.shape is None or len(target.shape) != 2:
            raise WireError("target_prompt_logprobs", "expected a 2-D int64 tensor of token ids")
    return SampleRequest(
        prompt=decode_model_input(_required(body, "prompt", ""), "prompt"),
        num_samples=1
        if num_samples is None
        else _int(num_samples, "num_samples", lo=1, hi=_MAX_NUM_SAMPLES),
        sampling_params=_decode_sampling_params(
            _required(body, "sampling_params", ""), "sampling_params"
        ),
        model_path=_opt_str(body, "model_path", ""),
        base_model=_opt_str(body, "base_model", ""),
        sampling_session_id=_opt_str(body, "sampling_session_id", ""),
        seq_id=_opt_int(body, "seq_id", "", lo=0),
        prompt_logprobs=_opt_bool(body, "prompt_logprobs", "", False),
        topk_prompt_logprobs=_opt_int(body, "topk_prompt_logprobs", "", lo=0) or 0,
        topk_sample_logprobs=_opt_int(body, "topk_sample_logprobs", "", lo=0) or 0,
        target_prompt_logprobs=target,
        prompt_alt_tokens_k=_opt_int(body, "prompt_alt_tokens_k", "", lo=0) or 0,
        prompt_logprobs_last_n=_opt_int(body, "prompt_logprobs_last_n", "", lo=1),
        record_stability_info=_opt_bool(body, "record_stability_info", "", False),
    )


_DECODERS: Final[dict[str, Callable[[dict[str, Any], _Budget], Request]]] = {
    "create_session": _decode_create_session,
    "create_model": _decode_create_model,
    "forward": _decode_forward,
    "forward_backward": _decode_forward_backward,
    "optim_step": _decode_optim_step,
    "save_weights": _decode_save_weights,
    "load_weights": _decode_load_weights,
    "save_weights_for_sampler": _decode_save_for_sampler,
    "retrieve_future": _decode_retrieve_future,
    "create_sampling_session": _decode_create_sampling_session,
    "asample": _decode_sample,
    "sample": _decode_sample,
}


def decode_request(endpoint: str, body: Any) -> Request:
    """Decode a request body for an endpoint name (``"forward"``, ``"forward_backward"``,
    ``"optim_step"``, ``"create_model"``, ...).

    ``endpoint`` may also be the path (``"/api/v1/forward"``). Fields the reference
    client or tinker 0.38 send that the trainer does not use (``optimizer_config``,
    ``display_name``, ``kind``, ``weights_access_token``, ...) are ignored.

    Raises:
        WireError: The body is malformed; ``field`` names the offending value.
        ValueError: ``endpoint`` names no known endpoint.
    """
    name = endpoint.strip("/").removeprefix("api/v1/")
    decoder = _DECODERS.get(name)
    if decoder is None:
        raise ValueError(f"unknown endpoint {endpoint!r}")
    return decoder(_obj(body, ""), _Budget())


# --------------------------------------------------------------------------- acknowledgements


@attrs.frozen(kw_only=True)
class FutureAck:
    """The answer to a future-returning POST (§4.1).

    ``sample_sequence_ids`` (one per requested sample) is required by tinker 0.38 on
    ``asample`` acknowledgements: tinker stamps them onto the returned sequences.
    """

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: Sequence[str] | None = None


def encode_future_ack(ack: FutureAck) -> JSON:
    """Encode a submission acknowledgement."""
    body: JSON = {"request_id": ack.request_id}
    if ack.model_id is not None:
        body["model_id"] = ack.model_id
    if ack.sample_sequence_ids is not None:
        body["sample_sequence_ids"] = list(ack.sample_sequence_ids)
    return body


def decode_future_ack(obj: Any) -> FutureAck:
    """Decode a submission acknowledgement.

    Raises:
        WireError: No string ``request_id``, or malformed optional fields.
    """
    body = _obj(obj, "")
    ids_raw = body.get("sample_sequence_ids")
    ids = None
    if ids_raw is not None:
        ids = [
            _str(s, f"sample_sequence_ids[{i}]")
            for i, s in enumerate(_list(ids_raw, "sample_sequence_ids"))
        ]
    return FutureAck(
        request_id=_str(_required(body, "request_id", ""), "request_id"),
        model_id=_opt_str(body, "model_id", ""),
        sample_sequence_ids=ids,
    )


# --------------------------------------------------------------------------- results


def validate_metric_keys(metrics: Mapping[str, float]) -> None:
    """Check that every key has exactly one colon and a known reduction (§6.6).

    Raises:
        ValueError: Naming the first bad key (a `WireError` whose field is
            ``metrics.<key>``).
    """
    known = ", ".join(sorted(METRIC_REDUCTIONS))
    for key in metrics:
        key = str(key)
        if key.count(":") != 1:
            raise WireError(
                f"metrics.{key}", "metric keys look like 'name:reduction' with exactly one colon"
            )
        name, reduction = key.split(":")
        if not name:
            raise WireError(f"metrics.{key}", "the metric name before the colon is empty")
        if reduction not in METRIC_REDUCTIONS:
            raise WireError(
                f"metrics.{key}",
                f"unknown reduction {reduction!r}; expected one of {known}",
            )


def _encode_result_tensor(tensor: tinker.TensorData, field: str, *, v2: bool) -> JSON:
    dense = _dense_numpy(tensor, field)
    if dense.dtype.kind == "f" and not np.isfinite(dense).all():
        i = int(np.flatnonzero(~np.isfinite(dense.reshape(-1)))[0])
        raise WireError(f"{field}.data[{i}]", "non-finite number in a result tensor")
    return {
        "data": _wire_values(dense.reshape(-1), str(tensor.dtype), v2=v2),
        "dtype": str(tensor.dtype),
        "shape": [int(d) for d in dense.shape],
    }


def encode_forward_backward_output(
    output: tinker.ForwardBackwardOutput, *, v2: bool = False
) -> JSON:
    """Encode a result: dense float32/int64 tensors, finite numbers, metric keys
    ``name:reduction``.

    With ``v2``, long float32 tensors are written as shortest float32 decimals, which
    both reference clients parse to the same float32 values.

    Raises:
        WireError: A bad metric key, a non-finite number or an unsupported dtype.
    """
    validate_metric_keys(output.metrics)
    metrics = {key: _metric_value(value, f"metrics.{key}") for key, value in output.metrics.items()}
    outputs = [
        {
            name: _encode_result_tensor(tensor, f"loss_fn_outputs[{i}].{name}", v2=v2)
            for name, tensor in record.items()
        }
        for i, record in enumerate(output.loss_fn_outputs)
    ]
    return {
        "loss_fn_output_type": output.loss_fn_output_type,
        "loss_fn_outputs": outputs,
        "metrics": metrics,
    }


def decode_forward_backward_output(obj: Any) -> tinker.ForwardBackwardOutput:
    """Decode a forward/forward_backward result.

    Raises:
        WireError: Missing keys, bad tensors or non-numeric metrics.
    """
    body = _obj(obj, "")
    output_type = _str(
        _required(body, "loss_fn_output_type", ""), "loss_fn_output_type", allow_empty=True
    )
    raw_outputs = _list(_required(body, "loss_fn_outputs", ""), "loss_fn_outputs")
    raw_metrics = _obj(_required(body, "metrics", ""), "metrics")
    budget = _Budget()
    outputs: list[dict[str, tinker.TensorData]] = []
    for i, raw in enumerate(raw_outputs):
        path = f"loss_fn_outputs[{i}]"
        outputs.append(
            {
                name: _decode_tensor(t, f"{path}.{name}", budget)
                for name, t in _obj(raw, path).items()
            }
        )
    metrics = {key: _float(value, f"metrics.{key}") for key, value in raw_metrics.items()}
    return tinker.ForwardBackwardOutput(
        loss_fn_output_type=output_type, loss_fn_outputs=outputs, metrics=metrics
    )


def _weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    if sum(weights) == 0:
        return float(np.mean(values))
    return float(np.average(values, weights=weights))


def combine_outputs(
    outputs: Sequence[tinker.ForwardBackwardOutput],
) -> tinker.ForwardBackwardOutput:
    """Combine the results of the chunks of one call: concatenate ``loss_fn_outputs``
    and reduce metrics by their ``:reduction`` suffix (§6.6).

    The key set comes from the first chunk; keys missing from any chunk and unknown
    reductions are dropped. ``mean`` and ``slack`` are weighted by each chunk's number of
    outputs; ``unique`` keeps the first value under the key and later ones under
    ``key_1``, ``key_2``, ...

    Raises:
        WireError: A metric key without exactly one colon (the reference client fails
            on those too).
    """
    if not outputs:
        return tinker.ForwardBackwardOutput(loss_fn_output_type="", loss_fn_outputs=[], metrics={})
    weights = [len(o.loss_fn_outputs) for o in outputs]
    metrics: dict[str, float] = {}
    for key in outputs[0].metrics:
        if key.count(":") != 1:
            raise WireError(
                f"metrics.{key}", "metric keys look like 'name:reduction' with exactly one colon"
            )
        reduction = key.split(":")[1]
        if reduction not in METRIC_REDUCTIONS or any(key not in o.metrics for o in outputs):
            continue
        values = [o.metrics[key] for o in outputs]
        if len(values) == 1 and reduction in ("sum", "min", "max"):
            # One chunk (most calls): numpy would return this very value, only slower.
            metrics[key] = float(values[0])
        elif reduction == "sum":
            metrics[key] = float(np.sum(values))
        elif reduction == "mean":
            metrics[key] = _weighted_mean(values, weights)
        elif reduction == "slack":
            metrics[key] = float(np.max(values)) - _weighted_mean(values, weights)
        elif reduction == "min":
            metrics[key] = float(np.min(values))
        elif reduction == "max":
            metrics[key] = float(np.max(values))
        elif reduction == "hash_unordered":
            # Order-insensitive combination of per-chunk hashes, as the reference does.
            metrics[key] = hash(tuple(sorted(int(v) for v in values)))
        else:  # unique
            metrics[key] = values[0]
            metrics.update({f"{key}_{i}": v for i, v in enumerate(values[1:], start=1)})
    return tinker.ForwardBackwardOutput(
        loss_fn_output_type=outputs[0].loss_fn_output_type,
        loss_fn_outputs=[record for o in outputs for record in o.loss_fn_outputs],
        metrics=metrics,
    )


def _stored_count(tensor: tinker.TensorData) -> int:
    if tensor.sparse_col_indices is not None:
        return len(tensor.sparse_col_indices)
    return int(tensor.to_numpy().size)


def _estimated_bytes(datum: tinker.Datum) -> int:
    total = 0
    for chunk in datum.model_input.chunks:
        if isinstance(chunk, ImageChunk):
            total += len(chunk.data)
        elif isinstance(chunk, DmelChunk):
            total += len(chunk.dmel)
        elif isinstance(chunk, ImageAssetPointerChunk):
            total += len(chunk.location)
        else:
            total += chunk.length * 10
    return total + sum(_stored_count(t) * 10 for t in datum.loss_fn_inputs.values())


def chunk_data(
    data: Sequence[tinker.Datum], *, max_datums: int = 1024, max_bytes: int = 5_000_000
) -> list[list[tinker.Datum]]:
    """Split a batch the way the reference client does (§5.4): at most ``max_datums``
    datums and about ``max_bytes`` estimated bytes per chunk, in order.

    The estimate is 10 bytes per token (an image counts its raw bytes) plus 10 bytes per
    stored ``loss_fn_inputs`` value. A datum over ``max_bytes`` on its own forms its own
    chunk.
    """
    chunks: list[list[tinker.Datum]] = []
    current: list[tinker.Datum] = []
    current_bytes = 0
    for datum in data:
        size = _estimated_bytes(datum)
        if (current and current_bytes + size > max_bytes) or len(current) == max_datums:
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(datum)
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------- sampling results


def _float32_list_or_none(values: npt.NDArray[Any]) -> list[float | None]:
    """float32 values widened exactly, with NaN ("not computed") as None."""
    narrow = np.asarray(values, dtype=np.float32).reshape(-1)
    result: list[float | None] = list(narrow.astype(np.float64).tolist())
    for i in np.flatnonzero(np.isnan(narrow)):
        result[int(i)] = None
    return result


def _sequence_arrays(
    seq: tinker.SampledSequence,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    tokens = seq.tokens_np if seq.tokens_np is not None else np.asarray(seq.tokens)
    logprobs = seq.logprobs_np
    if logprobs is None and seq.logprobs is not None:
        logprobs = np.asarray(seq.logprobs)
    return (
        np.asarray(tokens, dtype=np.int64).reshape(-1),
        None if logprobs is None else np.asarray(logprobs, dtype=np.float32).reshape(-1),
    )


def _topk_json(topk: TopkLogprobs) -> list[list[tuple[int, float]] | None]:
    """Rows of ``(token_id, logprob)`` pairs, trailing sentinel cells dropped and an
    all-sentinel row as None (the reference client's list form)."""
    ids = np.asarray(topk.token_ids, dtype=np.int64)
    lps = np.asarray(topk.logprobs, dtype=np.float32).astype(np.float64)
    real = ~((ids == 0) & (lps == _TOPK_MASK_LOGPROB))
    result: list[list[tuple[int, float]] | None] = []
    for row in range(ids.shape[0]):
        present = np.flatnonzero(real[row])
        if present.size == 0:
            result.append(None)
            continue
        keep = int(present[-1]) + 1
        result.append(list(zip(ids[row, :keep].tolist(), lps[row, :keep].tolist(), strict=True)))
    return result


def encode_sample_response(response: tinker.SampleResponse) -> JSON:
    """Encode a sampling result in the JSON shape of the reference ``SampleResponse``
    (``sequences`` of ``stop_reason``/``tokens``/``logprobs``, ``prompt_logprobs`` with
    null where not computed, ``topk_prompt_logprobs``, ``prompt_cache_hit_tokens``).

    tinker 0.38's SDK reads sampling results only as protobuf: serve it
    `encode_sample_response_proto` instead.

    Raises:
        WireError: A stop reason other than ``stop``/``length``.
    """
    sequences: list[JSON] = []
    for i, seq in enumerate(response.sequences):
        if seq.stop_reason not in _STOP_REASONS:
            raise WireError(
                f"sequences[{i}].stop_reason", f"unknown stop reason {seq.stop_reason!r}"
            )
        tokens, logprobs = _sequence_arrays(seq)
        item: JSON = {"stop_reason": seq.stop_reason, "tokens": tokens}
        if logprobs is not None:
            item["logprobs"] = logprobs.astype(np.float64)
        if isinstance(seq.sequence_id, str):
            item["sequence_id"] = seq.sequence_id
        sequences.append(item)
    body: JSON = {"sequences": sequences, "type": "sample"}
    if response.prompt_logprobs_np is not None:
        body["prompt_logprobs"] = _float32_list_or_none(response.prompt_logprobs_np)
    elif response.prompt_logprobs is not None:
        body["prompt_logprobs"] = list(response.prompt_logprobs)
    if response.topk_prompt_logprobs_np is not None:
        body["topk_prompt_logprobs"] = _topk_json(response.topk_prompt_logprobs_np)
    elif response.topk_prompt_logprobs is not None:
        body["topk_prompt_logprobs"] = response.topk_prompt_logprobs
    body["prompt_cache_hit_tokens"] = int(response.prompt_cache_hit_tokens)
    if response.target_prompt_logprobs is not None:
        body["target_prompt_logprobs"] = encode_tensor(response.target_prompt_logprobs)
    if response.prompt_alt_tokens is not None:
        body["prompt_alt_tokens"] = {
            "tokens": encode_tensor(response.prompt_alt_tokens.tokens),
            "logprobs": encode_tensor(response.prompt_alt_tokens.logprobs),
        }
    return body


def _optional_float32(value: Any, field: str) -> npt.NDArray[np.float32]:
    """A float32 array from a list of numbers or nulls (null becomes NaN)."""
    items = _list(value, field)
    kinds = set(map(type, items))
    if not kinds <= {int, float, type(None)}:
        i = _first_bad_index(items, (int, float, type(None)))
        raise WireError(f"{field}[{i}]", f"expected a number or null, got {_type_name(items[i])}")
    if type(None) not in kinds:
        return _float32_array(items, field)
    wide = np.array([math.nan if v is None else v for v in items], dtype=np.float64)
    present = ~np.isnan(wide)
    narrow = np.full(wide.shape, np.nan, dtype=np.float32)
    narrow[present] = _narrow_to_float32(wide[present])
    if not np.isfinite(narrow[present]).all():
        raise WireError(field, "number out of the float32 range")
    return narrow


def _decode_topk(value: Any, field: str) -> TopkLogprobs:
    rows = _list(value, field)
    parsed: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None] = []
    k = 0
    for i, row in enumerate(rows):
        path = f"{field}[{i}]"
        if row is None:
            parsed.append(None)
            continue
        pairs = _list(row, path)
        ids: list[Any] = []
        lps: list[Any] = []
        for j, pair in enumerate(pairs):
            pair_list = _list(pair, f"{path}[{j}]")
            if len(pair_list) != 2:
                raise WireError(f"{path}[{j}]", "expected a [token_id, logprob] pair")
            ids.append(pair_list[0])
            lps.append(pair_list[1])
        parsed.append((_np_int64(_token_ids(ids, path)), _float32_array(lps, path)))
        k = max(k, len(pairs))
    token_ids = np.zeros((len(rows), k), dtype=np.int32)
    logprobs = np.full((len(rows), k), _TOPK_MASK_LOGPROB, dtype=np.float32)
    for i, entry in enumerate(parsed):
        if entry is not None:
            token_ids[i, : entry[0].size] = entry[0]
            logprobs[i, : entry[1].size] = entry[1]
    return TopkLogprobs(token_ids=token_ids, logprobs=logprobs)


def _np_int64(values: list[int]) -> npt.NDArray[np.int64]:
    return np.array(values, dtype=np.int64)


def decode_sample_response(obj: Any) -> tinker.SampleResponse:
    """Decode a sampling result written by `encode_sample_response`.

    Raises:
        WireError: Missing sequences, bad tokens, stop reasons or numbers.
    """
    body = _obj(obj, "")
    _check_type(body, "sample", "")
    budget = _Budget()
    sequences: list[tinker.SampledSequence] = []
    for i, raw in enumerate(_list(_required(body, "sequences", ""), "sequences")):
        path = f"sequences[{i}]"
        seq = _obj(raw, path)
        stop_reason = seq.get("stop_reason")
        if stop_reason not in _STOP_REASONS:
            raise WireError(
                _key(path, "stop_reason"), f"expected 'stop' or 'length', got {stop_reason!r}"
            )
        tokens = _np_int64(_token_ids(_required(seq, "tokens", path), _key(path, "tokens")))
        logprobs_raw = seq.get("logprobs")
        logprobs = None
        if logprobs_raw is not None:
            logprobs = _float32_array(logprobs_raw, _key(path, "logprobs"))
            if logprobs.size != tokens.size:
                raise WireError(
                    _key(path, "logprobs"), f"{logprobs.size} logprobs for {tokens.size} tokens"
                )
        sequence_id = seq.get("sequence_id")
        sequences.append(
            tinker.SampledSequence(
                stop_reason=stop_reason,
                sequence_id=_str(sequence_id, _key(path, "sequence_id"))
                if sequence_id is not None
                else "",
                tokens_np=tokens.astype(np.int32),
                logprobs_np=logprobs,
            )
        )
    prompt_raw = body.get("prompt_logprobs")
    topk_raw = body.get("topk_prompt_logprobs")
    target_raw = body.get("target_prompt_logprobs")
    alt_raw = body.get("prompt_alt_tokens")
    alt = None
    if alt_raw is not None:
        alt_obj = _obj(alt_raw, "prompt_alt_tokens")
        alt = PromptAltTokens(
            tokens=_decode_tensor(
                _required(alt_obj, "tokens", "prompt_alt_tokens"),
                "prompt_alt_tokens.tokens",
                budget,
            ),
            logprobs=_decode_tensor(
                _required(alt_obj, "logprobs", "prompt_alt_tokens"),
                "prompt_alt_tokens.logprobs",
                budget,
            ),
        )
    cache_hits = body.get("prompt_cache_hit_tokens")
    return tinker.SampleResponse(
        sequences=sequences,
        prompt_logprobs_np=None
        if prompt_raw is None
        else _optional_float32(prompt_raw, "prompt_logprobs"),
        topk_prompt_logprobs_np=None
        if topk_raw is None
        else _decode_topk(topk_raw, "topk_prompt_logprobs"),
        target_prompt_logprobs=None
        if target_raw is None
        else _decode_tensor(target_raw, "target_prompt_logprobs", budget),
        prompt_cache_hit_tokens=0
        if cache_hits is None
        else _int(cache_hits, "prompt_cache_hit_tokens", lo=0),
        prompt_alt_tokens=alt,
    )


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
    """Encode a ``retrieve_future`` answer.

    Raises:
        WireError: A success payload that is not an object or that the client would
            misread as another outcome (an ``"error"`` key, ``"type": "try_again"``,
            ``"status": "complete_metadata"``).
    """
    if isinstance(outcome, TryAgain):
        body: JSON = {"type": "try_again", "request_id": outcome.request_id}
        if outcome.queue_state is not None:
            body["queue_state"] = outcome.queue_state
        return body
    if isinstance(outcome, CompleteMetadata):
        return {
            "status": "complete_metadata",
            "response_payload_size": outcome.response_payload_size,
        }
    if isinstance(outcome, FutureFailed):
        category = outcome.category if outcome.category in _ERROR_CATEGORIES else "unknown"
        body = {"error": outcome.error, "category": category}
        if outcome.error_class is not None:
            body["error_class"] = outcome.error_class
        return body
    payload = _obj(outcome.payload, "")
    if "error" in payload:
        raise WireError("error", "a success payload must not have an 'error' key")
    if payload.get("type") == "try_again" or payload.get("status") == "complete_metadata":
        raise WireError("", "a success payload must not look like a pending answer")
    return payload


def decode_future_outcome(obj: Any) -> FutureOutcome:
    """Classify a ``retrieve_future`` answer in the reference client's order (§4.3).

    Raises:
        WireError: The body is not a JSON object.
    """
    body = _obj(obj, "")
    if body.get("type") == "try_again":
        request_id = body.get("request_id")
        queue_state = body.get("queue_state")
        return TryAgain(
            request_id if isinstance(request_id, str) else "",
            queue_state if isinstance(queue_state, str) else None,
        )
    if body.get("status") == "complete_metadata":
        size = body.get("response_payload_size")
        return CompleteMetadata(0 if size is None else _int(size, "response_payload_size", lo=0))
    if "error" in body:
        error = body["error"]
        category = body.get("category")
        error_class = body.get("error_class")
        if not (
            isinstance(error_class, str)
            and len(error_class.encode("utf-8", "replace")) <= _MAX_ERROR_CLASS_BYTES
        ):
            error_class = None
        return FutureFailed(
            error if isinstance(error, str) else ("unknown error" if error is None else str(error)),
            category if category in _ERROR_CATEGORIES else "unknown",
            error_class,
        )
    return FutureResult(body)


# --------------------------------------------------------------------------- tinker protobuf


def _pb() -> Any:
    """tinker's generated protobuf module (imported on first use)."""
    return importlib.import_module("tinker.proto.tinker_public_pb2")


def _topk_proto(pb: Any, topk: TopkLogprobs) -> Any:
    ids = np.ascontiguousarray(topk.token_ids, dtype=np.int32)
    return pb.TopkLogprobs(
        token_ids=ids.tobytes(),
        logprobs=np.ascontiguousarray(topk.logprobs, dtype=np.float32).tobytes(),
        k=int(ids.shape[1]) if ids.ndim == 2 else 0,
        length=int(ids.shape[0]),
    )


def _tensor_proto(pb: Any, tensor: tinker.TensorData) -> Any:
    dtype = _check_dtype(tensor, "tensor")
    np_dtype = np.int64 if dtype == "int64" else np.float32
    msg = pb.Tensor(dtype=pb.DTYPE_INT64 if dtype == "int64" else pb.DTYPE_FLOAT32)
    if tensor.sparse_crow_indices is not None and tensor.sparse_col_indices is not None:
        msg.shape.extend(int(d) for d in (tensor.shape or []))
        msg.sparse_csr.values = np.ascontiguousarray(
            _stored_values(tensor), dtype=np_dtype
        ).tobytes()
        msg.sparse_csr.crow_indices = np.asarray(
            tensor.sparse_crow_indices, dtype=np.int64
        ).tobytes()
        msg.sparse_csr.col_indices = np.asarray(tensor.sparse_col_indices, dtype=np.int64).tobytes()
        return msg
    dense = np.ascontiguousarray(tensor.to_numpy(), dtype=np_dtype)
    msg.shape.extend(int(d) for d in dense.shape)
    msg.dense = dense.tobytes()
    return msg


def encode_sample_response_proto(response: tinker.SampleResponse) -> bytes:
    """Encode a sampling result as the ``tinker_public.SampleResponse`` protobuf that
    tinker 0.38's ``SamplingClient`` reads (serve it as ``application/x-protobuf``).

    Raises:
        WireError: A stop reason other than ``stop``/``length``.
    """
    pb = _pb()
    msg = pb.SampleResponse(prompt_cache_hit_tokens=int(response.prompt_cache_hit_tokens))
    for i, seq in enumerate(response.sequences):
        if seq.stop_reason not in _STOP_REASONS:
            raise WireError(
                f"sequences[{i}].stop_reason", f"unknown stop reason {seq.stop_reason!r}"
            )
        tokens, logprobs = _sequence_arrays(seq)
        item = msg.sequences.add()
        item.stop_reason = (
            pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        )
        item.tokens = tokens.astype(np.int32).tobytes()
        if logprobs is not None:
            item.logprobs = logprobs.tobytes()
        if seq.topk_logprobs_np is not None:
            item.topk_sampled_logprobs.CopyFrom(_topk_proto(pb, seq.topk_logprobs_np))
    if response.prompt_logprobs_np is not None:
        msg.prompt_logprobs = np.ascontiguousarray(
            response.prompt_logprobs_np, dtype=np.float32
        ).tobytes()
    elif response.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in response.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    if response.topk_prompt_logprobs_np is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk_proto(pb, response.topk_prompt_logprobs_np))
    if response.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(_tensor_proto(pb, response.target_prompt_logprobs))
    if response.prompt_alt_tokens is not None:
        msg.prompt_alt_tokens.tokens.CopyFrom(_tensor_proto(pb, response.prompt_alt_tokens.tokens))
        msg.prompt_alt_tokens.logprobs.CopyFrom(
            _tensor_proto(pb, response.prompt_alt_tokens.logprobs)
        )
    data: bytes = msg.SerializeToString()
    return data


def encode_forward_backward_output_proto(output: tinker.ForwardBackwardOutput) -> bytes:
    """Encode a result as the ``tinker_public.ForwardBackwardOutput`` protobuf that
    tinker 0.38 reads (serve it as ``application/x-protobuf``).

    Consecutive datums with the same fields, dtypes and trailing shapes share one
    ``ArrayRecord``; each field's per-datum values are concatenated with int64 byte
    offsets.

    Raises:
        WireError: As for `encode_forward_backward_output`.
    """
    validate_metric_keys(output.metrics)
    pb = _pb()
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for key, value in output.metrics.items():
        msg.metrics[key] = _metric_value(value, f"metrics.{key}")
    groups: list[tuple[Any, list[dict[str, npt.NDArray[Any]]]]] = []
    names = set(output.loss_fn_outputs[0]) if output.loss_fn_outputs else set()
    for i, record in enumerate(output.loss_fn_outputs):
        # tinker's reader looks every field up for every datum.
        if set(record) != names:
            raise WireError(f"loss_fn_outputs[{i}]", "every datum needs the same output fields")
        dense = {
            name: _dense_numpy(t, f"loss_fn_outputs[{i}].{name}") for name, t in record.items()
        }
        for name, array in dense.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise WireError(
                    f"loss_fn_outputs[{i}].{name}", "non-finite number in a result tensor"
                )
        signature = tuple(
            (name, a.dtype.str, a.shape[1:] if a.ndim else ()) for name, a in dense.items()
        )
        if groups and groups[-1][0] == signature:
            groups[-1][1].append(dense)
        else:
            groups.append((signature, [dense]))
    for signature, datums in groups:
        record_msg = msg.loss_fn_outputs.add(
            type_tag=output.loss_fn_output_type, num_datums=len(datums)
        )
        for name, dtype_str, trailing in signature:
            arrays = [np.ascontiguousarray(d[name]).reshape(-1) for d in datums]
            sizes = np.array([a.nbytes for a in arrays], dtype=np.int64)
            batched = record_msg.fields[name]
            batched.data = np.concatenate(arrays).tobytes() if arrays else b""
            batched.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tobytes()
            batched.dtype = pb.DTYPE_INT64 if np.dtype(dtype_str).kind == "i" else pb.DTYPE_FLOAT32
            batched.trailing_shape.extend(int(d) for d in trailing)
    data: bytes = msg.SerializeToString()
    return data


# Element types of a BatchedTensor (tinker_public.DType) and how each is widened: the
# protobuf result decodes to the same dtypes (float32, int64) as the JSON one.
_PROTO_FLOAT32, _PROTO_INT64, _PROTO_INT32, _PROTO_BFLOAT16 = 1, 2, 3, 4
_PROTO_ITEM: Final[dict[int, np.dtype[Any]]] = {
    _PROTO_FLOAT32: np.dtype("<f4"),
    _PROTO_INT64: np.dtype("<i8"),
    _PROTO_INT32: np.dtype("<i4"),
    _PROTO_BFLOAT16: np.dtype("<u2"),
}


def _widened(
    raw: npt.NDArray[Any], proto_dtype: int
) -> tuple[npt.NDArray[Any], Literal["float32", "int64"]]:
    """Copy of ``raw`` (a read-only view of the message) as float32 or int64."""
    if proto_dtype == _PROTO_BFLOAT16:
        # A bfloat16 is the high half of a float32.
        return (raw.astype(np.uint32) << 16).view(np.float32), "float32"
    if proto_dtype == _PROTO_FLOAT32:
        return raw.astype(np.float32), "float32"
    return raw.astype(np.int64), "int64"


def _split_batched(batched: Any, datums: int, field: str) -> list[tinker.TensorData]:
    """One BatchedTensor (values of ``datums`` datums, concatenated) split per datum."""
    item = _PROTO_ITEM.get(batched.dtype)
    if item is None:
        raise WireError(_key(field, "dtype"), f"unsupported tensor dtype {batched.dtype}")
    raw_offsets: bytes = batched.offsets
    if len(raw_offsets) != 8 * (datums + 1):
        raise WireError(
            _key(field, "offsets"), f"expected {datums + 1} int64 offsets for {datums} datums"
        )
    offsets = np.frombuffer(raw_offsets, dtype="<i8")
    data: bytes = batched.data
    trailing = [int(d) for d in batched.trailing_shape]
    row = item.itemsize * math.prod(trailing)
    sizes = np.diff(offsets)
    if (
        offsets[0] != 0
        or offsets[-1] != len(data)
        or (sizes.size and sizes.min() < 0)
        or any(d < 0 for d in trailing)
        or (row == 0 and bool(sizes.any()))
        or (row > 0 and bool((sizes % row).any()))
    ):
        raise WireError(
            _key(field, "offsets"),
            f"byte offsets do not split {len(data)} bytes into {datums} datums of "
            f"{item.itemsize}-byte values with trailing shape {trailing}",
        )
    values, dtype = _widened(np.frombuffer(data, dtype=item), batched.dtype)
    if dtype == "float32" and not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values))[0])
        raise WireError(f"{field}.data[{i}]", "non-finite number in a result tensor")
    bounds = (offsets // item.itemsize).tolist()
    out = []
    for start, end in itertools.pairwise(bounds):
        array = values[start:end].reshape(-1, *trailing)
        out.append(tinker.TensorData(data=array, dtype=dtype, shape=list(array.shape)))
    return out


def decode_forward_backward_output_proto(data: bytes) -> tinker.ForwardBackwardOutput:
    """Decode a forward/forward_backward result sent as the ``tinker_public``
    ``ForwardBackwardOutput`` protobuf (wire.md §4.7), the inverse of
    `encode_forward_backward_output_proto`.

    Each ``ArrayRecord`` holds ``num_datums`` datums; each of its fields concatenates
    their values, split by int64 byte offsets. Values decode to float32 (float32,
    bfloat16) and int64 (int64, int32) tensors, as JSON results do, copied out of the
    message in one piece per field rather than element by element.

    Raises:
        WireError: A malformed message, offsets that do not split the data, an unknown
            dtype, a non-finite value or metric.
    """
    try:
        msg = _pb().ForwardBackwardOutput.FromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError, a C-level error
        raise WireError("", f"malformed protobuf ForwardBackwardOutput: {exc}") from None
    outputs: list[dict[str, tinker.TensorData]] = []
    for r, record in enumerate(msg.loss_fn_outputs):
        datums = int(record.num_datums)
        per_datum: list[dict[str, tinker.TensorData]] = [{} for _ in range(datums)]
        for name, batched in record.fields.items():
            tensors = _split_batched(batched, datums, f"loss_fn_outputs[{r}].fields.{name}")
            for i, tensor in enumerate(tensors):
                per_datum[i][name] = tensor
        outputs += per_datum
    metrics = {key: _float(value, f"metrics.{key}") for key, value in msg.metrics.items()}
    return tinker.ForwardBackwardOutput(
        loss_fn_output_type=msg.loss_fn_output_type, loss_fn_outputs=outputs, metrics=metrics
    )
