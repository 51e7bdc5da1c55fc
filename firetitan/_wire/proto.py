"""tinker's protobuf results (§4.7): `encode_sample_response_proto`,
`encode_forward_backward_output_proto` and `decode_forward_backward_output_proto`,
written and read with tinker's generated message classes (imported on first use).
"""

from __future__ import annotations

import importlib
import itertools
import math
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import tinker
from tinker.types.topk_logprobs import TopkLogprobs

from firetitan._wire._json import WireError, _float, _key, _metric_value
from firetitan._wire.results import _STOP_REASONS, _sequence_arrays, validate_metric_keys
from firetitan._wire.tensors import _check_dtype, _dense_numpy, _stored_values

__all__ = [
    "decode_forward_backward_output_proto",
    "encode_forward_backward_output_proto",
    "encode_sample_response_proto",
]


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
