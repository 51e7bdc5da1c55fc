"""Forward/backward and sampling results as JSON (§6.6).

Result encoders and decoders, metric keys and their ``:reduction`` suffixes
(`validate_metric_keys`, `combine_outputs`), and the reference client's batch chunking
(`chunk_data`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import tinker
from tinker.types import DmelChunk, ImageAssetPointerChunk, ImageChunk, PromptAltTokens
from tinker.types.topk_logprobs import TopkLogprobs

from firetitan._wire._json import (
    JSON,
    WireError,
    _check_type,
    _first_bad_index,
    _float,
    _float32_array,
    _int,
    _key,
    _list,
    _metric_value,
    _narrow_to_float32,
    _obj,
    _required,
    _str,
    _token_ids,
    _type_name,
)
from firetitan._wire.tensors import (
    _Budget,
    _decode_tensor,
    _decode_tensor_as_sent,
    _dense_numpy,
    _wire_values,
    encode_tensor,
)

__all__ = [
    "METRIC_REDUCTIONS",
    "chunk_data",
    "combine_outputs",
    "decode_forward_backward_output",
    "decode_sample_response",
    "encode_forward_backward_output",
    "encode_sample_response",
    "validate_metric_keys",
]

#: Metric reductions a ``name:reduction`` key may name (§6.6).
METRIC_REDUCTIONS: Final = frozenset(
    {"sum", "mean", "slack", "min", "max", "hash_unordered", "unique"}
)

_TOPK_MASK_LOGPROB: Final = -99999.0

_STOP_REASONS: Final = ("stop", "length")


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
    (``sequences`` of ``stop_reason``/``tokens``/``logprobs``/``topk_logprobs``,
    ``prompt_logprobs`` with null where not computed, ``topk_prompt_logprobs``,
    ``prompt_cache_hit_tokens``, ``target_prompt_logprobs``, ``prompt_alt_tokens``).

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
        if seq.topk_logprobs_np is not None:
            item["topk_logprobs"] = _topk_json(seq.topk_logprobs_np)
        elif seq.topk_logprobs is not None:
            item["topk_logprobs"] = seq.topk_logprobs
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
        topk_raw = seq.get("topk_logprobs")
        sequences.append(
            tinker.SampledSequence(
                stop_reason=stop_reason,
                sequence_id=_str(sequence_id, _key(path, "sequence_id"))
                if sequence_id is not None
                else "",
                tokens_np=tokens.astype(np.int32),
                logprobs_np=logprobs,
                topk_logprobs_np=None
                if topk_raw is None
                else _decode_topk(topk_raw, _key(path, "topk_logprobs")),
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
        else _decode_tensor_as_sent(target_raw, "target_prompt_logprobs", budget),
        prompt_cache_hit_tokens=0
        if cache_hits is None
        else _int(cache_hits, "prompt_cache_hit_tokens", lo=0),
        prompt_alt_tokens=alt,
    )
