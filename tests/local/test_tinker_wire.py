"""tinker 0.38's protobuf forward_backward bodies: built by tinker's own request code,
decoded by `firetitan.local.tinker.wire`, compared with the datums that went in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tinker
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_proto_response
from tinker.resources.training import AsyncTrainingResource
from tinker.types import (
    ClientConfigResponse,
    DmelChunk,
    ForwardBackwardInput,
    ForwardBackwardRequest,
    ImageChunk,
    SampledSequence,
)
from tinker.types.provenance_spans import PromptProvenanceSpan, SampledProvenanceSpan

from firetitan import _wire
from firetitan.local.tinker import wire as tw

# --------------------------------------------------------------------------- helpers


class _CapturingClient:
    """Just enough of tinker's ``AsyncTinker`` for its training resource to build and
    "send" a forward_backward request; the body and headers are kept for the test."""

    def __init__(self, *, compress: bool) -> None:
        self._client_config = ClientConfigResponse(proto_compress_fwdbwd=compress)
        self.sent: tuple[str, bytes, dict[str, str]] | None = None

    async def post(self, path: str, *, body: bytes, options: Any, cast_to: Any) -> None:
        self.sent = (path, body, dict(options.get("headers", {})))

    get = patch = put = delete = get_api_list = post


def tinker_sends(
    data: list[tinker.Datum],
    *,
    loss_fn: str = "cross_entropy",
    loss_fn_config: dict[str, float | str] | None = None,
    forward_only: bool = False,
    compress: bool = False,
    model_id: str = "sess-1:train:0",
    seq_id: int = 7,
) -> tuple[dict[str, str], bytes]:
    """What tinker 0.38's ``AsyncTrainingResource.forward_backward`` puts on the wire."""
    client = _CapturingClient(compress=compress)
    resource = AsyncTrainingResource(client)  # type: ignore[arg-type]
    request = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=loss_fn_config
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    asyncio.run(resource.forward_backward(request=request, forward_only=forward_only))
    assert client.sent is not None
    path, body, headers = client.sent
    assert path == "/api/v1/forward_backward"
    return headers, body


def decode(headers: dict[str, str], body: bytes, **limits: int) -> _wire.ForwardRequest:
    assert tw.is_tinker_protobuf(headers)
    return tw.decode_forward_backward_request(
        body, content_encoding=headers.get("Content-Encoding"), **limits
    )


def assert_same_datum(got: tinker.Datum, want: tinker.Datum) -> None:
    assert got.model_input == want.model_input
    assert sorted(got.loss_fn_inputs) == sorted(want.loss_fn_inputs)
    for name, tensor in want.loss_fn_inputs.items():
        decoded = got.loss_fn_inputs[name]
        expected = tensor.to_numpy()  # tinker's own densification for CSR inputs
        assert decoded.dtype == tensor.dtype, name
        assert decoded.sparse_crow_indices is None, name
        assert decoded.shape == list(expected.shape), name
        array = decoded.to_numpy()
        assert array.dtype == expected.dtype, name
        np.testing.assert_array_equal(array, expected, err_msg=name)


def dense_datum() -> tinker.Datum:
    n = 6
    return tinker.Datum(
        model_input=tinker.ModelInput(
            chunks=[
                tinker.EncodedTextChunk(tokens=[151644, 872, 198]),
                tinker.EncodedTextChunk(tokens=[0, 2**31 - 1, 5]),
            ]
        ),
        loss_fn_inputs={
            "target_tokens": np.arange(100, 100 + n, dtype=np.int64),
            "weights": np.array([0, 0, 1, 0.5, -2, 1e-30], dtype=np.float32),
            "advantages": [0.25, -1.0, 3.5, 0.0, 1.0, 2.0],  # a plain list: float32 by key
            "logprobs": torch.linspace(-3, 0, n * 2).reshape(n, 2),  # 2-D, dense
        },
    )


def sparse_datum() -> tinker.Datum:
    # 2-D torch tensors under these keys become CSR when that is smaller (tinker's rule).
    targets = torch.zeros(5, 4, dtype=torch.int64)
    targets[0, 2] = 42
    targets[3, 0] = 7
    targets[3, 3] = 9
    weights = torch.zeros(5, 4)
    weights[1, 1] = 0.5
    weights[4, 3] = -1.25
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3, 4, 5]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    assert all(t.sparse_crow_indices is not None for t in datum.loss_fn_inputs.values())
    return datum


def proto_request(
    *tensors: pb.Tensor, forward_only: bool = False, chunks: list[pb.Chunk] | None = None
) -> pb.ForwardBackwardRequest:
    """A hand-built request for shapes tinker never writes (int32, bf16, malformed)."""
    msg = pb.ForwardBackwardRequest(
        model_id="m-1", seq_id=3, loss_fn="cross_entropy", forward_only=forward_only
    )
    datum = msg.data.add()
    for chunk in chunks if chunks is not None else [text_chunk([1, 2, 3])]:
        datum.model_input.add().CopyFrom(chunk)
    for i, tensor in enumerate(tensors):
        datum.loss_fn_inputs["weights" if i == 0 else f"t{i}"].CopyFrom(tensor)
    return msg


def text_chunk(tokens: list[int]) -> pb.Chunk:
    return pb.Chunk(encoded_text=pb.EncodedTextChunk(tokens=np.array(tokens, "<i4").tobytes()))


def dense(values: Any, dtype: int = pb.DTYPE_FLOAT32, shape: list[int] | None = None) -> pb.Tensor:
    raw = np.asarray(values, dtype={1: "<f4", 2: "<i8", 3: "<i4", 4: "<u2"}.get(dtype, "<f4"))
    return pb.Tensor(dense=raw.tobytes(), dtype=dtype, shape=shape or [])


def csr(values: list[float], crow: list[int], col: list[int], shape: list[int]) -> pb.Tensor:
    return pb.Tensor(
        sparse_csr=pb.SparseCsr(
            values=np.array(values, "<f4").tobytes(),
            crow_indices=np.array(crow, "<i8").tobytes(),
            col_indices=np.array(col, "<i8").tobytes(),
        ),
        dtype=pb.DTYPE_FLOAT32,
        shape=shape,
    )


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("forward_only", [False, True], ids=["forward_backward", "forward"])
def test_tinker_bodies_decode_to_the_datums_sent(compress: bool, forward_only: bool) -> None:
    data = [dense_datum(), sparse_datum(), dense_datum()]
    headers, body = tinker_sends(
        data,
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "mode": "tis"},
        forward_only=forward_only,
        compress=compress,
    )
    assert (headers.get("Content-Encoding") == "zstd") is compress

    request = decode(headers, body)

    assert request.model_id == "sess-1:train:0"
    assert request.seq_id == 7
    assert request.forward_only is forward_only
    assert request.loss_fn == "ppo"
    assert request.loss_fn_config == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.2,
        "mode": "tis",
    }
    assert request.comms is None
    assert len(request.data) == len(data)
    for got, want in zip(request.data, data, strict=True):
        assert_same_datum(got, want)


def test_decoded_tensors_are_writable_numpy_arrays() -> None:
    headers, body = tinker_sends([dense_datum(), sparse_datum()])
    for datum in decode(headers, body).data:
        for tensor in datum.loss_fn_inputs.values():
            array = tensor.to_numpy()
            assert isinstance(array, np.ndarray)
            assert array.flags.writeable  # torch.from_numpy takes it without a warning


def test_a_boolean_config_value_arrives_as_a_number_and_no_config_as_none() -> None:
    headers, body = tinker_sends([dense_datum()], loss_fn_config={"score_centering": True})
    assert decode(headers, body).loss_fn_config == {"score_centering": 1.0}
    headers, body = tinker_sends([dense_datum()])
    assert decode(headers, body).loss_fn_config is None


def test_the_legacy_float_map_is_read_when_v2_is_absent() -> None:
    msg = proto_request(dense([1.0, 1.0, 1.0]))
    msg.loss_fn_config["clip_low_threshold"] = 0.75
    request = tw.decode_forward_backward_request(msg.SerializeToString())
    assert request.loss_fn_config == {"clip_low_threshold": 0.75}


def test_v2_wins_over_the_legacy_map() -> None:
    msg = proto_request(dense([1.0, 1.0, 1.0]))
    msg.loss_fn_config["beta"] = 1.0
    msg.loss_fn_config_v2["beta"].number = 2.0
    msg.loss_fn_config_v2["variant"].text = "gspo"
    request = tw.decode_forward_backward_request(msg.SerializeToString())
    assert request.loss_fn_config == {"beta": 2.0, "variant": "gspo"}


def test_int32_widens_to_int64_and_bfloat16_to_float32() -> None:
    # Values exactly representable in bfloat16, written as the upper halves of float32s.
    floats = np.array([1.0, -2.5, 0.15625, 0.0, -0.0, 2.0**100], dtype=np.float32)
    bf16 = (floats.view(np.uint32) >> 16).astype("<u2")
    msg = proto_request(
        dense(bf16, pb.DTYPE_BFLOAT16, [2, 3]),
        dense([5, -7, 2**31 - 1], pb.DTYPE_INT32),
    )
    request = tw.decode_forward_backward_request(msg.SerializeToString())
    inputs = request.data[0].loss_fn_inputs
    assert inputs["weights"].dtype == "float32"
    np.testing.assert_array_equal(inputs["weights"].to_numpy(), floats.reshape(2, 3))
    assert inputs["t1"].dtype == "int64"
    assert inputs["t1"].to_numpy().dtype == np.int64
    np.testing.assert_array_equal(inputs["t1"].to_numpy(), [5, -7, 2**31 - 1])


def test_a_missing_shape_means_one_dimension_and_empty_tensors_decode() -> None:
    msg = proto_request(dense([1.0, 2.0]), dense([], pb.DTYPE_INT64, [0, 3]))
    inputs = tw.decode_forward_backward_request(msg.SerializeToString()).data[0].loss_fn_inputs
    assert inputs["weights"].shape == [2]
    assert inputs["t1"].shape == [0, 3]
    assert inputs["t1"].to_numpy().shape == (0, 3)


def test_provenance_spans_are_kept() -> None:
    msg = proto_request(dense([1.0, 1.0, 1.0]))
    span = msg.data[0].model_input_spans.add()
    span.sampled_tokens.sequence_id = "s:0:0"
    span.sampled_tokens.length = 3
    prompt = msg.data[0].loss_fn_input_spans.add()
    prompt.prompt_tokens.sequence_id = "s:0:0"
    prompt.prompt_tokens.offset = 1
    prompt.prompt_tokens.length = 3
    datum = tw.decode_forward_backward_request(msg.SerializeToString()).data[0]
    assert datum.model_input_spans == [SampledProvenanceSpan(sequence_id="s:0:0", length=3)]
    assert datum.loss_fn_input_spans == [
        PromptProvenanceSpan(sequence_id="s:0:0", offset=1, length=3)
    ]
    bare = tw.decode_forward_backward_request(proto_request(dense([1.0])).SerializeToString())
    assert bare.data[0].model_input_spans is None and bare.data[0].loss_fn_input_spans is None


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 6),
    cols=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.0, 0.4),
)
def test_csr_tensors_densify_as_tinker_does(
    rows: int, cols: int, seed: int, density: float
) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(1, 50_000, size=(rows, cols))
    mask = rng.random((rows, cols)) < density
    targets = torch.from_numpy(np.where(mask, values, 0))
    weights = torch.from_numpy(
        np.where(mask, rng.normal(size=(rows, cols)), 0.0).astype(np.float32)
    )
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(list(range(rows))),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    body = forward_backward_request_to_proto(
        ForwardBackwardRequest(
            forward_backward_input=ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
            model_id="m",
            seq_id=1,
        )
    ).SerializeToString()
    assert_same_datum(tw.decode_forward_backward_request(body).data[0], datum)


# --------------------------------------------------------------------------- bad bodies


def _mutate(fn: Callable[[pb.ForwardBackwardRequest], None]) -> bytes:
    _, body = tinker_sends([dense_datum(), sparse_datum()])
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(body)
    fn(msg)
    return bytes(msg.SerializeToString())


def _weights(msg: pb.ForwardBackwardRequest, i: int = 0) -> pb.Tensor:
    return msg.data[i].loss_fn_inputs["weights"]


def _set_weights(msg: pb.ForwardBackwardRequest, tensor: pb.Tensor, i: int = 0) -> None:
    msg.data[i].loss_fn_inputs["weights"].CopyFrom(tensor)


FB = "forward_backward_input"
W0 = f"{FB}.data[0].loss_fn_inputs.weights"
W1 = f"{FB}.data[1].loss_fn_inputs.weights"
T1 = f"{FB}.data[1].loss_fn_inputs.target_tokens"

BAD_DATA: list[tuple[str, Callable[[pb.ForwardBackwardRequest], None], str]] = [
    ("unspecified dtype", lambda m: setattr(_weights(m), "dtype", 0), f"{W0}.dtype"),
    ("unknown dtype", lambda m: setattr(_weights(m), "dtype", 9), f"{W0}.dtype"),
    (
        "ragged bytes",
        lambda m: setattr(_weights(m), "dense", _weights(m).dense[:-1]),
        f"{W0}.data",
    ),
    (
        "length does not match shape",
        lambda m: _set_weights(m, dense([1.0] * 5, shape=[6])),
        f"{W0}.shape",
    ),
    (
        "negative dimension",
        lambda m: _set_weights(m, dense([], shape=[-1])),
        f"{W0}.shape",
    ),
    (
        "no elements yet too big for numpy",
        lambda m: _set_weights(m, dense([], shape=[0, 2**62])),
        f"{W0}.shape",
    ),
    (
        "NaN",
        lambda m: _set_weights(m, dense([0.0, 1.0, float("nan")])),
        f"{W0}.data[2]",
    ),
    (
        "infinity in bfloat16",
        lambda m: _set_weights(m, dense([0x3F80, 0x7F80], pb.DTYPE_BFLOAT16)),
        f"{W0}.data[1]",
    ),
    (
        "no data at all",
        lambda m: _set_weights(m, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3])),
        f"{W0}.data",
    ),
    (
        "CSR with a 1-D shape",
        lambda m: _set_weights(m, csr([1.0], [0, 1], [0], [4]), 1),
        f"{W1}.shape",
    ),
    (
        "CSR with too few row pointers",
        lambda m: _set_weights(m, csr([1.0], [0, 1], [0], [2, 2]), 1),
        f"{W1}.sparse_crow_indices",
    ),
    (
        "CSR row pointers not from 0",
        lambda m: _set_weights(m, csr([1.0], [1, 1, 1], [0], [2, 2]), 1),
        f"{W1}.sparse_crow_indices",
    ),
    (
        "CSR row pointers decreasing",
        lambda m: _set_weights(m, csr([1.0, 2.0], [0, 2, 1, 2], [0, 1], [3, 2]), 1),
        f"{W1}.sparse_crow_indices",
    ),
    (
        "CSR column out of range",
        lambda m: _set_weights(m, csr([1.0, 2.0], [0, 1, 2], [0, 2], [2, 2]), 1),
        f"{W1}.sparse_col_indices[1]",
    ),
    (
        "CSR negative column",
        lambda m: _set_weights(m, csr([1.0], [0, 1, 1], [-1], [2, 2]), 1),
        f"{W1}.sparse_col_indices[0]",
    ),
    (
        "CSR duplicate column in a row",
        lambda m: _set_weights(m, csr([1.0, 2.0], [0, 2, 2], [1, 1], [2, 2]), 1),
        f"{W1}.sparse_col_indices",
    ),
    (
        "CSR index count differs from value count",
        lambda m: _set_weights(m, csr([1.0, 2.0], [0, 2, 2], [1], [2, 2]), 1),
        f"{W1}.sparse_col_indices",
    ),
    (
        "CSR index bytes ragged",
        lambda m: setattr(
            m.data[1].loss_fn_inputs["target_tokens"].sparse_csr,
            "crow_indices",
            m.data[1].loss_fn_inputs["target_tokens"].sparse_csr.crow_indices + b"\0",
        ),
        f"{T1}.sparse_crow_indices",
    ),
    (
        "CSR that would expand past the budget",
        lambda m: _set_weights(m, csr([], [0] * 100_001, [], [100_000, 100_000]), 1),
        W1,
    ),
    (
        "negative token id",
        lambda m: m.data[0].model_input[1].CopyFrom(text_chunk([3, -4, 5])),
        f"{FB}.data[0].model_input.chunks[1].tokens[1]",
    ),
    (
        "ragged token bytes",
        lambda m: setattr(m.data[1].model_input[0].encoded_text, "tokens", b"\1\0\0"),
        f"{FB}.data[1].model_input.chunks[0].tokens",
    ),
    (
        "chunk of no known type",
        lambda m: m.data[1].model_input.add(),
        f"{FB}.data[1].model_input.chunks[1].type",
    ),
    ("no datums", lambda m: m.ClearField("data"), f"{FB}.data"),
    ("no loss", lambda m: setattr(m, "loss_fn", ""), f"{FB}.loss_fn"),
    (
        "non-finite config number",
        lambda m: setattr(m.loss_fn_config_v2["beta"], "number", float("inf")),
        f"{FB}.loss_fn_config.beta",
    ),
    (
        "config value of neither kind",
        lambda m: m.loss_fn_config_v2["beta"].Clear(),
        f"{FB}.loss_fn_config.beta",
    ),
    (
        "non-finite legacy config number",
        lambda m: m.loss_fn_config.__setitem__("beta", float("nan")),
        f"{FB}.loss_fn_config.beta",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_data_names_the_field_and_keeps_the_address(
    mutate: Callable[[pb.ForwardBackwardRequest], None], field: str
) -> None:
    body = _mutate(mutate)
    with pytest.raises(tw.InvalidForwardData) as info:
        tw.decode_forward_backward_request(body)
    assert info.value.field == field, info.value
    # The server can still fail this request in its place in the sequence.
    assert (info.value.model_id, info.value.seq_id, info.value.forward_only) == (
        "sess-1:train:0",
        7,
        False,
    )


def test_a_forward_pass_reports_paths_under_forward_input() -> None:
    headers, body = tinker_sends([dense_datum()], loss_fn="", forward_only=True)
    with pytest.raises(tw.InvalidForwardData) as info:
        decode(headers, body)
    assert info.value.field == "forward_input.loss_fn"
    assert info.value.forward_only is True


@pytest.mark.parametrize(
    ("chunk", "word"),
    [
        (ImageChunk(data=b"\x89PNG....", format="png", expected_tokens=4), "image"),
        (DmelChunk(dmel=b"\0" * 16), "dmel"),
    ],
    ids=["image", "dmel"],
)
def test_image_and_audio_chunks_are_refused_by_name(
    chunk: tinker.ModelInputChunk, word: str
) -> None:
    datum = tinker.Datum(
        model_input=tinker.ModelInput(chunks=[tinker.EncodedTextChunk(tokens=[1, 2]), chunk]),
        loss_fn_inputs={"target_tokens": np.array([2, 3, 4, 5, 6, 7])},
    )
    headers, body = tinker_sends([dense_datum(), datum])
    with pytest.raises(tw.InvalidForwardData) as info:
        decode(headers, body)
    assert info.value.field == f"{FB}.data[1].model_input.chunks[1].type"
    assert word in info.value.reason


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: setattr(m, "model_id", ""), "model_id"),
        (lambda m: setattr(m, "seq_id", 0), "seq_id"),
        (lambda m: setattr(m, "seq_id", -5), "seq_id"),
    ],
    ids=["no model_id", "seq_id 0 (absent)", "negative seq_id"],
)
def test_bad_addressing_is_a_plain_wire_error(
    mutate: Callable[[pb.ForwardBackwardRequest], None], field: str
) -> None:
    with pytest.raises(_wire.WireError) as info:
        tw.decode_forward_backward_request(_mutate(mutate))
    assert not isinstance(info.value, tw.InvalidForwardData)
    assert info.value.field == field


@pytest.mark.parametrize(
    "body", [b"\xff\xff\xff\xff", b"\x1a\x05abc", b'{"model_id": "m"}'], ids=repr
)
def test_bytes_that_are_not_a_request_are_refused(body: bytes) -> None:
    with pytest.raises(_wire.WireError) as info:
        tw.decode_forward_backward_request(body)
    assert info.value.field in ("", "model_id")


# --------------------------------------------------------------------------- decompression

LIMIT = 1 << 20


def test_a_zstd_bomb_is_stopped_at_the_limit() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * LIMIT))
    assert len(bomb) < 8 * 1024
    with pytest.raises(_wire.WireError, match="limit"):
        tw.decompress_body(bomb, "zstd", max_bytes=LIMIT)


def test_a_zstd_bomb_without_a_declared_size_is_stopped_too() -> None:
    streamer = zstandard.ZstdCompressor().compressobj()
    bomb = streamer.compress(b"\0" * (64 * LIMIT)) + streamer.flush()
    assert zstandard.frame_content_size(bomb) == -1
    with pytest.raises(_wire.WireError, match="limit"):
        tw.decompress_body(bomb, "zstd", max_bytes=LIMIT)


def test_the_limit_applies_to_the_decoded_request() -> None:
    headers, body = tinker_sends([dense_datum()] * 200, compress=True)
    size = len(zstandard.ZstdDecompressor().decompress(body))
    assert decode(headers, body, max_body_bytes=size).data
    with pytest.raises(_wire.WireError, match="limit"):
        decode(headers, body, max_body_bytes=size - 1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"plainly not zstd", "not zstd"),
        (zstandard.ZstdCompressor().compress(b"x" * 5000)[:-4], "truncated"),
        (zstandard.ZstdCompressor().compress(b"abc") + b"junk", "after the end"),
        (b"", "not zstd"),
    ],
    ids=["garbage", "truncated", "trailing data", "empty"],
)
def test_broken_zstd_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(_wire.WireError, match=reason):
        tw.decompress_body(body, "zstd", max_bytes=LIMIT)


def test_identity_bodies_are_capped_and_other_codings_refused() -> None:
    assert tw.decompress_body(b"abc", None, max_bytes=3) == b"abc"
    assert tw.decompress_body(b"abc", " Identity ", max_bytes=3) == b"abc"
    with pytest.raises(_wire.WireError, match="limit"):
        tw.decompress_body(b"abcd", None, max_bytes=3)
    with pytest.raises(tw.UnsupportedContentEncoding):
        tw.decompress_body(b"abc", "gzip", max_bytes=3)
    assert tw.decompress_body(zstandard.ZstdCompressor().compress(b"abc"), "ZSTD", max_bytes=3)


# --------------------------------------------------------------------------- headers


def test_tinker_request_headers_are_recognised() -> None:
    headers, _ = tinker_sends([dense_datum()])
    assert tw.is_tinker_protobuf(headers)
    assert tw.is_tinker_protobuf({"content-type": "Application/X-Protobuf; charset=binary"})
    assert not tw.is_tinker_protobuf({"Content-Type": "application/json"})
    assert not tw.is_tinker_protobuf({})


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/x-protobuf", True),  # tinker 0.38 for fwd/bwd and sample results
        ("application/x-protobuf, application/json", False),  # the Fireworks client
        ("application/json", False),
        (None, False),
    ],
)
def test_protobuf_results_go_to_clients_that_accept_nothing_else(
    accept: str | None, expected: bool
) -> None:
    headers = {} if accept is None else {"accept": accept}
    assert tw.wants_protobuf_result(headers) is expected


# --------------------------------------------------------------------------- results


def test_results_encoded_for_tinker_are_read_by_tinker() -> None:
    """The protobuf results the server sends these clients (encoded by the codec) come
    back through tinker's own result reader intact."""
    output = tinker.ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn",
        loss_fn_outputs=[
            {"logprobs": tinker.TensorData.from_numpy(np.array([-0.5, -1.5], np.float32))},
            {"logprobs": tinker.TensorData.from_numpy(np.array([-2.0], np.float32))},
        ],
        metrics={"loss:sum": 4.0},
    )
    got = deserialize_proto_response(
        _wire.encode_forward_backward_output_proto(output), tinker.ForwardBackwardOutput
    )
    assert isinstance(got, tinker.ForwardBackwardOutput)
    assert got.metrics == output.metrics
    assert [o["logprobs"].tolist() for o in got.loss_fn_outputs] == [[-0.5, -1.5], [-2.0]]

    sample = tinker.SampleResponse(
        sequences=[
            SampledSequence(
                stop_reason="length",
                sequence_id="s:0:0",
                tokens_np=np.array([5, 6], np.int32),
                logprobs_np=np.array([-0.25, -0.5], np.float32),
            )
        ],
        prompt_logprobs_np=np.array([np.nan, -1.0, -2.0], np.float32),
    )
    read = deserialize_proto_response(
        _wire.encode_sample_response_proto(sample), tinker.SampleResponse
    )
    assert isinstance(read, tinker.SampleResponse)
    assert read.sequences[0].tokens == [5, 6]
    assert read.sequences[0].logprobs == [-0.25, -0.5]
    assert read.sequences[0].stop_reason == "length"
    assert read.prompt_logprobs == [None, -1.0, -2.0]
