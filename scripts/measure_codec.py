"""Throughput of firetitan's wire codec on benchmark B3's batch, without network.

The codec is internal (``firetitan._wire``), so `benchmarks`, which measures through the
public API only, leaves it out; this measures each direction on each side, in MB/s, next
to bare orjson on the same JSON documents (the floor any JSON codec pays), and prints
the medians. ``benchmarks/NOTES.md`` reads it to explain B3's client CPU.

    PYTHONPATH=$PWD python scripts/measure_codec.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import tinker

from benchmarks._common import B3_DATUMS, B3_TOKENS
from benchmarks._peers import LOSS, large_arrays, tinker_batch
from firetitan import _wire

REPEATS = 9


def _cases() -> dict[str, tuple[float, Callable[[], Any]]]:
    """Each step by its label: the size of the body it handles (MB), and the step."""
    request = _wire.ForwardRequest(
        model_id="m", seq_id=1, data=tinker_batch(large_arrays()), loss_fn=LOSS, comms="v2"
    )
    rng = np.random.default_rng(5)
    output = tinker.ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn",
        loss_fn_outputs=[
            {"logprobs": tinker.TensorData.from_numpy(
                -rng.exponential(2.0, B3_TOKENS).astype(np.float32))}
            for _ in range(B3_DATUMS)
        ],
        metrics={"loss:sum": 1234.5},
    )  # fmt: skip
    request_bytes = _wire.dumps(_wire.encode_request(request))
    result_bytes = _wire.dumps(_wire.encode_forward_backward_output(output, v2=True))
    # The floor: the same JSON documents, already built, through orjson alone.
    request_doc = _wire.loads(request_bytes)
    req_mb, res_mb = len(request_bytes) / 1e6, len(result_bytes) / 1e6
    return {
        "client: encode request (encode_request + dumps)": (
            req_mb, lambda: _wire.dumps(_wire.encode_request(request))),
        "client: decode result (loads + decode + combine)": (
            res_mb, lambda: _wire.combine_outputs(
                [_wire.decode_forward_backward_output(_wire.loads(result_bytes))])),
        "trainer: decode request (loads + decode_request)": (
            req_mb, lambda: _wire.decode_request("forward_backward", _wire.loads(request_bytes))),
        "trainer: encode result (encode + dumps)": (
            res_mb, lambda: _wire.dumps(_wire.encode_forward_backward_output(output, v2=True))),
        "floor: orjson.dumps of the request document": (
            req_mb, lambda: orjson.dumps(request_doc)),
        "floor: orjson.loads of the result body": (res_mb, lambda: orjson.loads(result_bytes)),
    }  # fmt: skip


def main() -> None:
    cases = _cases()
    for _, step in cases.values():  # warm-up
        step()
    print(f"B3 batch: {B3_DATUMS} datums x {B3_TOKENS} tokens; median of {REPEATS} repeats")
    for label, (mb, step) in cases.items():
        speeds = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            step()
            speeds.append(mb / (time.perf_counter() - start))
        print(f"{label:52s} {statistics.median(speeds):7.0f} MB/s  (body {mb:.2f} MB)")


if __name__ == "__main__":
    main()
