"""Tensors, model inputs and datums (wire.md §6.1-§6.4).

`encode_tensor`/`decode_tensor` (dense and CSR), `encode_model_input`/
`decode_model_input` and `encode_datum`/`decode_datum`, plus the private helpers the
request and result codecs share: the per-body sparse budget (`_Budget`), dense
conversion and the v1/v2 float32 writing rule.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
import tinker
from tinker.types import ImageChunk

from firetitan._wire._json import (
    _V2_MIN_ELEMENTS,
    JSON,
    WireError,
    _float32_array,
    _int,
    _int_array,
    _key,
    _list,
    _obj,
    _opt_int,
    _required,
    _str,
    _token_ids,
)

__all__ = [
    "MAX_DENSE_ELEMENTS",
    "csr_cells",
    "decode_datum",
    "decode_model_input",
    "decode_tensor",
    "encode_datum",
    "encode_model_input",
    "encode_tensor",
]

#: Most elements that sparse (CSR) tensors of one decoded body may expand to. Dense
#: tensors need no such limit: their shape must match the values actually sent.
MAX_DENSE_ELEMENTS: Final = 1 << 26

_MAX_NDIM: Final = 16
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)


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


def _decode_tensor_as_sent(obj: Any, field: str, budget: _Budget) -> tinker.TensorData:
    """`_decode_tensor`'s checks, keeping a CSR tensor in CSR form (its listed cells
    mean something: a CSR ``target_prompt_logprobs`` asks, and is answered, only there)."""
    dense = _decode_tensor(obj, field, budget)
    if obj.get("sparse_crow_indices") is None:
        return dense
    crow = _int_array(obj["sparse_crow_indices"], _key(field, "sparse_crow_indices"))
    col = _int_array(obj["sparse_col_indices"], _key(field, "sparse_col_indices"))
    return tinker.TensorData(
        data=dense.to_numpy()[csr_cells(crow, col)],
        dtype=dense.dtype,
        shape=dense.shape,
        sparse_crow_indices=crow.tolist(),
        sparse_col_indices=col.tolist(),
    )


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
    row_of = _csr_rows(crow)
    # Within a row, columns must strictly increase (no duplicates), as torch requires.
    if np.any((row_of[1:] == row_of[:-1]) & (col[1:] <= col[:-1])):
        raise WireError(col_field, "columns must strictly increase within each row")
    budget.take(rows * cols, field)
    dense = np.full((rows, cols), pad, dtype=values.dtype)
    dense[row_of, col] = values
    return dense


def _csr_rows(crow: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.repeat(np.arange(crow.size - 1, dtype=np.int64), np.diff(crow))


def csr_cells(
    crow_indices: npt.ArrayLike, col_indices: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The (row, column) indices of the cells a checked 2-D CSR tensor lists, in the
    order of its values: ``dense[csr_cells(...)]`` reads them, assigning to it writes them."""
    crow = np.asarray(crow_indices, dtype=np.int64)
    return _csr_rows(crow), np.asarray(col_indices, dtype=np.int64)


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


#: The JSON text of 0.0 and 1.0 (with their separator), as orjson writes them from
#: float32 and from float64 alike.
_MASK_TEXT: Final = np.array([b"0.0,", b"1.0,"], dtype="S4")
_ONE_BITS: Final = np.float32(1.0).view(np.uint32)


def _mask_text(narrow: npt.NDArray[np.float32]) -> orjson.Fragment | None:
    """The JSON list of a long array holding only 0.0 and 1.0 (an SFT weights mask),
    made by numpy in one pass; None for any other array.

    The text is byte for byte what orjson writes for the array (v2 or not: both
    decimals are exact), which formats every float on its own and spends most of a
    large SFT request's encoding time on its weights.
    """
    if narrow.size < _V2_MIN_ELEMENTS:
        return None
    # Compared as bit patterns: -0.0 (written "-0.0") is no mask value.
    bits = narrow.view(np.uint32)
    ones = bits == _ONE_BITS
    if np.count_nonzero(ones) + np.count_nonzero(bits == 0) != bits.size:
        return None
    text = np.take(_MASK_TEXT, ones.view(np.uint8)).tobytes()
    return orjson.Fragment(b"[" + text[:-1] + b"]")


def _wire_values(
    flat: npt.NDArray[Any], dtype: str, *, v2: bool
) -> npt.NDArray[Any] | orjson.Fragment:
    """The ``data`` of a tensor: an array for `dumps` to write, or the finished JSON
    text of a weights mask (`_mask_text`)."""
    if dtype == "int64":
        return np.ascontiguousarray(flat, dtype=np.int64)
    narrow = np.ascontiguousarray(flat, dtype=np.float32)
    mask = _mask_text(narrow)
    if mask is not None:
        return mask
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
