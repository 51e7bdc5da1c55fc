"""Unit tests of the sans-IO wire codec (firetitan._wire)."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import orjson
import pytest
import tinker
import torch
from tinker.types import ImageChunk, PromptAltTokens
from tinker.types.topk_logprobs import TopkLogprobs

from firetitan import _wire as w
from firetitan._types import GradAccNormalization
from firetitan._wire.tensors import _stored_values

# --------------------------------------------------------------------------- helpers


def _datum(tokens: Sequence[int], **inputs: Any) -> tinker.Datum:
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(list(tokens)), loss_fn_inputs=inputs
    )


def _td(array: Any, dtype: str | None = None) -> tinker.TensorData:
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    return tinker.TensorData.from_numpy(arr)


def _wire_round_trip(body: Mapping[str, Any]) -> Any:
    return w.loads(w.dumps(body))


def _assert_tensor_equal(a: tinker.TensorData, b: tinker.TensorData) -> None:
    assert a.dtype == b.dtype
    x, y = a.to_numpy(), b.to_numpy()
    assert x.dtype == y.dtype
    assert x.shape == y.shape
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8))  # bit-exact, -0.0 included


def _assert_datums_equal(xs: Sequence[tinker.Datum], ys: Sequence[tinker.Datum]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.model_input.model_dump(mode="json") == y.model_input.model_dump(mode="json")
        assert x.loss_fn_inputs.keys() == y.loss_fn_inputs.keys()
        for key in x.loss_fn_inputs:
            _assert_tensor_equal(x.loss_fn_inputs[key], y.loss_fn_inputs[key])


def _batch(n: int = 3, length: int = 7, seed: int = 0) -> list[tinker.Datum]:
    rng = np.random.default_rng(seed)
    return [
        _datum(
            rng.integers(0, 150_000, length).tolist(),
            target_tokens=_td(rng.integers(0, 150_000, length)),
            weights=_td(rng.random(length, dtype=np.float32)),
        )
        for _ in range(n)
    ]


def _fb_body(datum_json: Any, **top: Any) -> dict[str, Any]:
    return {
        "forward_backward_input": {"data": [datum_json], "loss_fn": "cross_entropy"},
        "model_id": "m-1",
        "seq_id": 1,
        **top,
    }


def _good_datum_json() -> dict[str, Any]:
    return {
        "loss_fn_inputs": {
            "target_tokens": {"data": [1, 2, 3], "dtype": "int64", "shape": [3]},
            "weights": {"data": [0.0, 1.0, 1.0], "dtype": "float32", "shape": [3]},
        },
        "model_input": {"chunks": [{"tokens": [5, 1, 2], "type": "encoded_text"}]},
    }


def _expect_error(body: Any, field: str, endpoint: str = "forward_backward") -> w.WireError:
    with pytest.raises(w.WireError) as info:
        w.decode_request(endpoint, body)
    assert info.value.field == field, info.value
    return info.value


# --------------------------------------------------------------------------- dumps / loads


def test_dumps_serialises_numpy_and_loads_parses() -> None:
    body = {"a": np.arange(3, dtype=np.int64), "b": np.float32(0.5), "c": None, "d": [1, "x"]}
    assert w.loads(w.dumps(body)) == {"a": [0, 1, 2], "b": 0.5, "c": None, "d": [1, "x"]}
    assert w.loads("[1]") == [1]


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"x": math.nan}, "x"),
        ({"x": [1.0, math.inf]}, "x[1]"),
        ({"m": {"loss:sum": -math.inf}}, "m.loss:sum"),
        ({"t": {"data": np.array([0.0, 1.0, np.nan], dtype=np.float32)}}, "t.data[2]"),
        ({"s": np.float64("nan")}, "s"),
    ],
)
def test_dumps_refuses_non_finite(obj: Any, field: str) -> None:
    with pytest.raises(w.WireError) as info:
        w.dumps(obj)
    assert info.value.field == field


def test_dumps_keeps_genuine_nulls_and_refuses_unknown_types() -> None:
    assert w.dumps({"error": None, "text": "null"}) == b'{"error":null,"text":"null"}'
    with pytest.raises(w.WireError):
        w.dumps({"x": {1, 2}})
    with pytest.raises(w.WireError):
        w.dumps({"x": 2**70})


@pytest.mark.parametrize("text", [b"{", b"[NaN]", b"[Infinity]", b"1e400", b"", b"\xff"])
def test_loads_malformed(text: bytes) -> None:
    with pytest.raises(w.WireError) as info:
        w.loads(text)
    assert info.value.field == ""
    assert info.value.reason.startswith("malformed JSON")


# --------------------------------------------------------------------------- tensors


def test_dense_tensor_round_trip() -> None:
    for array in (
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array([-0.0, 1e-45, 3.4028235e38, -2.5], dtype=np.float32),
        np.zeros((2, 0), dtype=np.float32),
        np.array([2**62, -(2**62)], dtype=np.int64),
    ):
        tensor = tinker.TensorData.from_numpy(array)
        back = w.decode_tensor(_wire_round_trip(w.encode_tensor(tensor)))
        _assert_tensor_equal(tensor, back)
        assert back.shape == list(array.shape)


def test_v1_float32_is_the_exact_float64_value() -> None:
    body = w.dumps(w.encode_tensor(_td([0.1], "float32")))
    assert b"0.10000000149011612" in body


def test_missing_shape_is_one_dimensional() -> None:
    back = w.decode_tensor({"data": [1, 2, 3], "dtype": "int64"})
    assert back.shape == [3]
    assert back.to_numpy().tolist() == [1, 2, 3]
    # The reference client omits "shape" when the tensor has none; so do we.
    encoded = w.encode_tensor(tinker.TensorData(data=[1.5, 2.5], dtype="float32"))
    assert "shape" not in encoded


def test_ints_are_accepted_in_float32_tensors() -> None:
    back = w.decode_tensor({"data": [0, 1, 2], "dtype": "float32", "shape": [3]})
    assert back.to_numpy().dtype == np.float32


@pytest.mark.parametrize("dtype", ["int64", "float32"])
def test_csr_from_tinker_torch_sparse_round_trip(dtype: str) -> None:
    dense = torch.zeros(5, 6, dtype=torch.int64 if dtype == "int64" else torch.float32)
    dense[0, 2] = 7
    dense[3, 0] = 9
    dense[3, 5] = 4
    tensor = tinker.TensorData.from_torch_sparse(dense)
    assert tensor.sparse_crow_indices is not None  # tinker chose CSR
    encoded = _wire_round_trip(w.encode_tensor(tensor))
    assert encoded["sparse_crow_indices"] == [0, 1, 1, 1, 3, 3]
    assert encoded["sparse_col_indices"] == [2, 0, 5]
    back = w.decode_tensor(encoded)
    assert back.sparse_crow_indices is None
    assert back.shape == [5, 6]
    assert np.array_equal(back.to_numpy(), dense.numpy())


def test_csr_datum_inside_forward_backward() -> None:
    targets = torch.zeros(4, 8, dtype=torch.int64)
    targets[1, 3] = 11
    weights = torch.zeros(4, 8)
    weights[1, 3] = 0.25
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_torch_sparse(targets),
            "weights": tinker.TensorData.from_torch_sparse(weights),
        },
    )
    assert datum.loss_fn_inputs["weights"].sparse_crow_indices is not None
    request = w.ForwardRequest(model_id="m", seq_id=3, data=[datum], loss_fn="cross_entropy")
    back = w.decode_request("forward_backward", _wire_round_trip(w.encode_request(request)))
    assert isinstance(back, w.ForwardRequest)
    decoded = back.data[0].loss_fn_inputs
    assert np.array_equal(decoded["target_tokens"].to_numpy(), targets.numpy())
    assert np.array_equal(decoded["weights"].to_numpy(), weights.numpy())


def test_csr_decode_without_torch_matches_tinker_densify() -> None:
    obj = {
        "data": [42, 7, 9],
        "dtype": "int64",
        "shape": [3, 4],
        "sparse_crow_indices": [0, 1, 1, 3],
        "sparse_col_indices": [2, 0, 3],
    }
    expected = tinker.TensorData(
        data=[42, 7, 9],
        dtype="int64",
        shape=[3, 4],
        sparse_crow_indices=[0, 1, 1, 3],
        sparse_col_indices=[2, 0, 3],
    ).to_numpy()
    assert np.array_equal(w.decode_tensor(obj).to_numpy(), expected)


# --------------------------------------------------------------------------- float32 decimals


def _shortest(values: np.ndarray) -> list[float]:
    """What a v2 sender writes: orjson's shortest float32 decimals, parsed to float64."""
    parsed: list[float] = orjson.loads(orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY))
    return parsed


# Float32 values whose shortest decimal, parsed to float64, lands exactly on the midpoint
# to a neighbour so that plain float64 -> float32 rounding (ties to even) picks the
# neighbour. Found by an exhaustive scan of all positive finite float32 values.
_DOUBLE_ROUNDING_TRAPS = [0x15AE43FD]


def test_shortest_float32_decimal_double_rounding_trap() -> None:
    bits = np.array(_DOUBLE_ROUNDING_TRAPS, dtype=np.uint32)
    values = bits.view(np.float32)
    parsed = np.array(_shortest(values), dtype=np.float64)
    # The subtlety: the decimal is not the midpoint, but its float64 is.
    text = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    decimal = Fraction(text.strip("[]").split(",")[0])
    upper = np.nextafter(values[0], np.float32(np.inf))
    midpoint = (Fraction(float(values[0])) + Fraction(float(upper))) / 2
    assert decimal != midpoint and Fraction(float(parsed[0])) == midpoint
    assert not np.array_equal(parsed.astype(np.float32).view(np.uint32), bits)  # naive is wrong
    back = w.decode_tensor({"data": parsed.tolist(), "dtype": "float32"})
    assert np.array_equal(back.to_numpy().view(np.uint32), bits)


def test_exact_float64_ties_round_to_even() -> None:
    # 16777217 is exactly between the float32 values 16777216 and 16777218 and is
    # neither one's shortest decimal: plain round-to-nearest-even applies.
    back = w.decode_tensor({"data": [16777217.0, -16777219.0, 0.5], "dtype": "float32"})
    assert back.to_numpy().tolist() == [16777216.0, -16777220.0, 0.5]


def test_v2_shortest_float32_round_trip_is_bit_exact() -> None:
    rng = np.random.default_rng(1234)
    n = 200_000
    # Random bit patterns cover every exponent, subnormals and negative zero.
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) < np.finfo(np.float32).max)]
    subnormals = (rng.integers(1, 2**23, 5_000, dtype=np.uint32)).view(np.float32)
    traps = np.array(_DOUBLE_ROUNDING_TRAPS, dtype=np.uint32)
    # Neighbours of the traps sit next to the same midpoints.
    near = np.concatenate([traps - 2, traps - 1, traps, traps + 1, traps + 2]).view(np.float32)
    everything = np.concatenate([values, -subnormals, subnormals, near, -near, [np.float32(0.1)]])
    datum = _datum([1], weights=tinker.TensorData.from_numpy(everything))
    request = w.ForwardRequest(
        model_id="m", seq_id=1, data=[datum], loss_fn="cross_entropy", comms="v2"
    )
    body = w.dumps(w.encode_request(request))
    assert b'"comms":"v2"' in body
    assert b",0.1]" in body  # shortest float32 decimal, not 0.10000000149011612
    back = w.decode_request("forward_backward", w.loads(body))
    assert isinstance(back, w.ForwardRequest)
    got = back.data[0].loss_fn_inputs["weights"].to_numpy()
    assert np.array_equal(got.view(np.uint32), everything.view(np.uint32))


def test_v2_keeps_short_and_extreme_tensors_exact_like_the_reference() -> None:
    short = w.encode_tensor(_td(np.full(255, 0.1), "float32"), v2=True)
    assert short["data"].dtype == np.float64
    extreme = np.full(300, 0.1, dtype=np.float32)
    extreme[0] = np.finfo(np.float32).max
    assert w.encode_tensor(tinker.TensorData.from_numpy(extreme), v2=True)["data"].dtype == (
        np.float64
    )
    long = w.encode_tensor(_td(np.full(256, 0.1), "float32"), v2=True)
    assert long["data"].dtype == np.float32


def test_float32_overflow_and_non_finite_refused_on_decode() -> None:
    with pytest.raises(w.WireError) as info:
        w.decode_tensor({"data": [1.0, 1e39], "dtype": "float32"}, "t")
    assert info.value.field == "t.data[1]"
    # The largest decimal that still rounds to float32 max is accepted.
    ok = w.decode_tensor({"data": [3.4028235e38], "dtype": "float32"})
    assert ok.to_numpy()[0] == np.finfo(np.float32).max


# --------------------------------------------------------------------------- model input


def test_model_input_round_trip_with_image() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(50))
    model_input = tinker.ModelInput(
        chunks=[
            tinker.EncodedTextChunk(tokens=[151644, 872, 198]),
            ImageChunk(data=png, format="png", expected_tokens=16),
            tinker.EncodedTextChunk(tokens=[0]),
        ]
    )
    encoded = _wire_round_trip(w.encode_model_input(model_input))
    assert encoded["chunks"][1] == {
        "data": base64.b64encode(png).decode(),
        "format": "png",
        "expected_tokens": 16,
        "type": "image",
    }
    back = w.decode_model_input(encoded)
    assert back.model_dump(mode="json") == model_input.model_dump(mode="json")
    assert back.length == 3 + 16 + 1


def test_chunk_without_type_is_encoded_text() -> None:
    back = w.decode_model_input({"chunks": [{"tokens": [1, 2]}]})
    assert back.to_ints() == [1, 2]


# --------------------------------------------------------------------------- requests


def _round_trip_request(request: w.Request, endpoint: str) -> w.Request:
    return w.decode_request(endpoint, _wire_round_trip(w.encode_request(request)))


@pytest.mark.parametrize("forward_only", [True, False])
@pytest.mark.parametrize("comms", [None, "v2"])
def test_forward_round_trip(forward_only: bool, comms: str | None) -> None:
    data = _batch()
    request = w.ForwardRequest(
        model_id="m-1",
        seq_id=4,
        data=data,
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.8, "pooling": "mean", "flag": True, "n": 3},
        forward_only=forward_only,
        comms=comms,
    )
    body = _wire_round_trip(w.encode_request(request))
    assert ("forward_input" in body) is forward_only
    assert "type" not in body
    back = w.decode_request("forward" if forward_only else "forward_backward", body)
    assert isinstance(back, w.ForwardRequest)
    assert (back.model_id, back.seq_id, back.loss_fn) == ("m-1", 4, "ppo")
    assert back.loss_fn_config == request.loss_fn_config
    assert (back.forward_only, back.comms) == (forward_only, comms)
    _assert_datums_equal(back.data, data)


# A LoRA model's create_model options beyond the defaults (the round trip and the
# comparison with the Fireworks client add their own).
LORA: dict[str, Any] = {
    "session_id": "s",
    "base_model": "b",
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_init_method": "nora",
    "user_metadata": {"run": "r"},
}


def test_simple_request_round_trips() -> None:
    requests: list[tuple[w.Request, str]] = [
        (w.CreateSessionRequest(tags=["a"], user_metadata={"k": "v"}), "create_session"),
        (
            w.CreateModelRequest(
                **LORA, model_seq_id=2, lora_seed=7, train_mlp=False, projection_head_dim=64
            ),
            "create_model",
        ),
        (w.CreateModelRequest(session_id="s", model_seq_id=0, base_model="b"), "create_model"),
        (
            w.CreateModelRequest(session_id="s", model_seq_id=1, base_model="b", base_only=True),
            "create_model",
        ),
        (
            w.OptimStepRequest(
                model_id="m",
                seq_id=9,
                adam_params=tinker.AdamParams(learning_rate=1e-5, grad_clip_norm=1.0),
                grad_accumulation_normalization="num_loss_tokens",
                emit_grad_norm_metrics="basic",
            ),
            "optim_step",
        ),
        (
            w.OptimStepRequest(model_id="m", seq_id=9, adam_params=tinker.AdamParams()),
            "optim_step",
        ),
        (w.SaveWeightsRequest(model_id="m", seq_id=10, path="step-10"), "save_weights"),
        (
            w.SaveWeightsRequest(model_id="m", seq_id=10, path="m", user_metadata={"a": "b"}),
            "save_weights",
        ),
        (
            w.SaveWeightsRequest(model_id="m", seq_id=10, path="s", overwrite=True, ttl_seconds=60),
            "save_weights",
        ),
        (
            w.LoadWeightsRequest(model_id="m", seq_id=1, path="cross_job://j/s", optimizer=True),
            "load_weights",
        ),
        (
            w.LoadWeightsRequest(
                session_id="s", model_seq_id=3, path="p", base_model="b", user_metadata={}
            ),
            "load_weights",
        ),
        (
            w.SaveWeightsForSamplerRequest(
                model_id="m",
                seq_id=11,
                path="step-10-a1b2c3d4",
                checkpoint_type="merged_base",
                export_precision="bf16",
                metadata={"decision_calibration": {"temperature": {"choice": 1.3}}},
            ),
            "save_weights_for_sampler",
        ),
        (
            w.SaveWeightsForSamplerRequest(model_id="m", seq_id=1, sampling_session_seq_id=2),
            "save_weights_for_sampler",
        ),
        (w.RetrieveFutureRequest(request_id="r", allow_metadata_only=True), "retrieve_future"),
        (
            w.CreateSamplingSessionRequest(
                session_id="s", sampling_session_seq_id=0, base_model="b", model_path="p"
            ),
            "create_sampling_session",
        ),
    ]
    for request, endpoint in requests:
        back = _round_trip_request(request, endpoint)
        if isinstance(request, w.OptimStepRequest):
            assert isinstance(back, w.OptimStepRequest)
            assert back.adam_params == request.adam_params
            assert back.grad_accumulation_normalization == request.grad_accumulation_normalization
            assert back.emit_grad_norm_metrics == request.emit_grad_norm_metrics
        else:
            assert back == request, endpoint


def test_create_model_bodies_match_wire_examples() -> None:
    lora = w.encode_request(
        w.CreateModelRequest(
            session_id="s", model_seq_id=0, base_model="b", lora_rank=16, lora_alpha=32
        )
    )
    assert lora["lora_config"] == {
        "alpha": 32,
        "rank": 16,
        "train_unembed": True,
        "train_mlp": True,
        "train_attn": True,
    }
    full = w.encode_request(
        w.CreateModelRequest(session_id="s", model_seq_id=1, base_model="b", lora_alpha=32)
    )
    assert full["lora_config"] == {
        "rank": 0,
        "train_unembed": True,
        "train_mlp": True,
        "train_attn": True,
    }
    base = w.encode_request(
        w.CreateModelRequest(session_id="s", model_seq_id=2, base_model="b", base_only=True)
    )
    assert base == {
        "session_id": "s",
        "model_seq_id": 2,
        "base_model": "b",
        "type": "create_model",
        "base_only": True,
    }


def test_optim_step_accepts_the_enum() -> None:
    body = w.encode_request(
        w.OptimStepRequest(
            model_id="m",
            seq_id=1,
            adam_params=tinker.AdamParams(),
            grad_accumulation_normalization=GradAccNormalization.NUM_SEQUENCES,
        )
    )
    assert w.dumps(body).endswith(b'"grad_accumulation_normalization":"num_sequences"}')


def test_load_weights_request_needs_one_target() -> None:
    with pytest.raises(ValueError):
        w.LoadWeightsRequest(path="p")
    with pytest.raises(ValueError):
        w.LoadWeightsRequest(model_id="m", seq_id=1, session_id="s", model_seq_id=0, path="p")
    create = w.LoadWeightsRequest(session_id="s", model_seq_id=4, path="p")
    assert create.creates_model and create.target_model_id == "s:train:4"


def test_sample_request_round_trip() -> None:
    prompt = tinker.ModelInput.from_ints([1, 2, 3, 4])
    target = torch.full((3, 4), -1, dtype=torch.int64)
    target[0, 1] = 17
    request = w.SampleRequest(
        prompt=prompt,
        num_samples=4,
        sampling_params=tinker.SamplingParams(max_tokens=20, temperature=0.7, stop=["\n"], seed=3),
        sampling_session_id="ss",
        seq_id=5,
        prompt_logprobs=True,
        topk_prompt_logprobs=2,
        topk_sample_logprobs=1,
        target_prompt_logprobs=tinker.TensorData.from_torch(target),
        prompt_alt_tokens_k=2,
        prompt_logprobs_last_n=2,
        record_stability_info=True,
    )
    back = _round_trip_request(request, "asample")
    assert isinstance(back, w.SampleRequest)
    assert back.sampling_params == request.sampling_params
    assert back.prompt.to_ints() == [1, 2, 3, 4]
    assert back.target_prompt_logprobs is not None
    assert np.array_equal(back.target_prompt_logprobs.to_numpy(), target.numpy())
    for name in (
        "num_samples",
        "sampling_session_id",
        "seq_id",
        "prompt_logprobs",
        "topk_prompt_logprobs",
        "topk_sample_logprobs",
        "prompt_alt_tokens_k",
        "prompt_logprobs_last_n",
        "record_stability_info",
    ):
        assert getattr(back, name) == getattr(request, name), name


def test_sparse_target_prompt_logprobs_keeps_its_layout() -> None:
    # Only the listed cells request anything (unlisted ones read as -1); the result
    # lists the same cells.
    body = {
        "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
        "sampling_params": {},
        "target_prompt_logprobs": {
            "data": [9],
            "dtype": "int64",
            "shape": [2, 3],
            "sparse_crow_indices": [0, 0, 1],
            "sparse_col_indices": [2],
        },
    }
    back = w.decode_request("asample", body)
    assert isinstance(back, w.SampleRequest)
    assert back.target_prompt_logprobs is not None
    target = back.target_prompt_logprobs
    assert target.sparse_crow_indices == [0, 0, 1] and target.sparse_col_indices == [2]
    assert target.to_numpy(pad_value=-1).tolist() == [[-1, -1, -1], [-1, -1, 9]]
    assert back.num_samples == 1 and back.sampling_params == tinker.SamplingParams()


def test_endpoint_paths_and_unknown_endpoint() -> None:
    body = {"request_id": "r"}
    assert w.decode_request("/api/v1/retrieve_future", body) == w.RetrieveFutureRequest(
        request_id="r"
    )
    with pytest.raises(ValueError):
        w.decode_request("no_such_endpoint", body)


# --------------------------------------------------------------------------- reference bodies


def _fireworks() -> Any:
    from fireworks.training.sdk import types as fw_types

    return fw_types


def _fw_dump(model: Any) -> Any:
    from fireworks.training.sdk._core._compat import model_dump

    return model_dump(model, exclude_unset=False, exclude_none=True, mode="json")


def _fw_datum(datum: tinker.Datum) -> Any:
    fw = _fireworks()
    chunks: list[Any] = []
    for chunk in datum.model_input.chunks:
        if isinstance(chunk, tinker.EncodedTextChunk):
            chunks.append(fw.EncodedTextChunk(tokens=list(chunk.tokens)))
        else:
            assert isinstance(chunk, ImageChunk)
            chunks.append(
                fw.ImageChunk(
                    data=chunk.data, format=chunk.format, expected_tokens=chunk.expected_tokens
                )
            )
    inputs = {}
    for name, tensor in datum.loss_fn_inputs.items():
        inputs[name] = fw.TensorData(
            data=_stored_values(tensor),
            dtype=tensor.dtype,
            shape=tensor.shape,
            sparse_crow_indices=tensor.sparse_crow_indices,
            sparse_col_indices=tensor.sparse_col_indices,
        )
    return fw.Datum(model_input=fw.ModelInput(chunks=chunks), loss_fn_inputs=inputs)


def _same_json(ours: Mapping[str, Any], reference: Any) -> None:
    """Equal values and equal key order."""
    parsed = w.loads(w.dumps(ours))
    assert parsed == reference
    assert orjson.dumps(parsed) == orjson.dumps(reference)


@pytest.mark.parametrize("comms", [None, "v2"])
@pytest.mark.parametrize("forward_only", [True, False])
def test_forward_bodies_equal_the_fireworks_client(comms: str | None, forward_only: bool) -> None:
    from fireworks.training.sdk._comms import comms_context
    from fireworks.training.sdk._core._json import _float32_training_json
    from fireworks.training.sdk._core.lib._pydantic_conv import to_pydantic_request

    fw = _fireworks()
    rng = np.random.default_rng(5)
    targets = torch.zeros(4, 8, dtype=torch.int64)
    targets[2, 5] = 3
    png = b"\x89PNG" + bytes(20)
    data = [
        *_batch(2, 300, seed=9),  # long enough for the v2 rule
        tinker.Datum(
            model_input=tinker.ModelInput(
                chunks=[
                    tinker.EncodedTextChunk(tokens=[1, 2]),
                    ImageChunk(data=png, format="png", expected_tokens=2),
                ]
            ),
            loss_fn_inputs={
                "target_tokens": tinker.TensorData.from_torch_sparse(targets),
                "advantages": _td(rng.standard_normal(4), "float32"),
            },
        ),
    ]
    config = {"clip_low_threshold": 0.8, "output": "embedding"}
    ours = w.encode_request(
        w.ForwardRequest(
            model_id="m-1",
            seq_id=7,
            data=data,
            loss_fn="ppo",
            loss_fn_config=config,
            forward_only=forward_only,
            comms=comms,
        )
    )
    fw_input = fw.ForwardBackwardInput(
        data=[_fw_datum(d) for d in data], loss_fn="ppo", loss_fn_config=config
    )
    with comms_context("v2" if comms == "v2" else "v1"):
        if forward_only:
            fw_request = fw.ForwardRequest(forward_input=fw_input, model_id="m-1", seq_id=7)
        else:
            fw_request = fw.ForwardBackwardRequest(
                forward_backward_input=fw_input, model_id="m-1", seq_id=7
            )
        reference = _fw_dump(to_pydantic_request(fw_request))
    if comms == "v2":
        reference = {**reference, "comms": "v2"}
        # The v2 client sends these exact bytes (orjson with float32 fragments).
        v2_bytes = orjson.dumps(_float32_training_json(reference))
        assert w.dumps(ours) == v2_bytes
        reference = w.loads(v2_bytes)
    _same_json(ours, reference)
    decoded = w.decode_request("forward" if forward_only else "forward_backward", reference)
    assert isinstance(decoded, w.ForwardRequest)
    assert (decoded.comms, decoded.loss_fn_config) == (comms, config)
    for got, sent in zip(decoded.data, data, strict=True):
        for key, tensor in sent.loss_fn_inputs.items():
            assert np.array_equal(got.loss_fn_inputs[key].to_numpy(), tensor.to_numpy())
        assert got.model_input == sent.model_input


# The export options the Fireworks client's body lacks: the comparison adds them.
MERGED_EXPORT: dict[str, Any] = {
    "checkpoint_type": "merged_base",
    "export_precision": "source",
    "metadata": {"decision_calibration": {"contract": "c"}},
}


def test_other_bodies_equal_the_fireworks_client() -> None:
    from fireworks.training.sdk.client import _BaseOnlyCreateModelRequest

    fw = _fireworks()
    cases: list[tuple[w.Request, Any, dict[str, Any]]] = [
        (
            w.CreateSessionRequest(tags=[], user_metadata={}),
            fw.CreateSessionRequest(tags=[], user_metadata={}, sdk_version="0.23.0"),
            {},
        ),
        (
            w.CreateModelRequest(**LORA, model_seq_id=0, lora_seed=3, projection_head_dim=8),
            fw.CreateModelRequest(
                session_id="s",
                model_seq_id=0,
                base_model="b",
                user_metadata={"run": "r"},
                projection_head_dim=8,
                lora_config=fw.LoraConfig(rank=16, alpha=32, seed=3, init_method="nora"),
            ),
            {},
        ),
        (
            w.CreateModelRequest(session_id="s", model_seq_id=1, base_model="b"),
            fw.CreateModelRequest(
                session_id="s", model_seq_id=1, base_model="b", lora_config=fw.LoraConfig(rank=0)
            ),
            {},
        ),
        (
            w.CreateModelRequest(session_id="s", model_seq_id=2, base_model="b", base_only=True),
            _BaseOnlyCreateModelRequest(
                session_id="s", model_seq_id=2, base_model="b", base_only=True
            ),
            {},
        ),
        (
            w.OptimStepRequest(
                model_id="m",
                seq_id=9,
                adam_params=tinker.AdamParams(learning_rate=1e-5, beta2=0.95, grad_clip_norm=1.0),
                grad_accumulation_normalization="num_loss_tokens",
                emit_grad_norm_metrics="basic",
            ),
            fw.OptimStepRequest(
                adam_params=fw.AdamParams(
                    learning_rate=1e-5, grad_clip_norm=1.0, emit_grad_norm_metrics="basic"
                ),
                model_id="m",
                seq_id=9,
            ),
            {"grad_accumulation_normalization": "num_loss_tokens"},
        ),
        (
            w.SaveWeightsRequest(model_id="m", seq_id=10, path="step-10"),
            fw.SaveWeightsRequest(model_id="m", path="step-10", seq_id=10),
            {},
        ),
        (
            w.LoadWeightsRequest(model_id="m", seq_id=1, path="cross_job://j/s", optimizer=True),
            fw.LoadWeightsRequest(model_id="m", path="cross_job://j/s", optimizer=True, seq_id=1),
            {},
        ),
        (
            w.SaveWeightsForSamplerRequest(
                model_id="m", seq_id=11, path="n-a1b2c3d4", **MERGED_EXPORT
            ),
            fw.SaveWeightsForSamplerRequest(model_id="m", path="n-a1b2c3d4", seq_id=11),
            MERGED_EXPORT,
        ),
        (
            w.RetrieveFutureRequest(request_id="r-1", allow_metadata_only=True),
            fw.FutureRetrieveRequest(request_id="r-1", allow_metadata_only=True),
            {},
        ),
    ]
    endpoints = {
        w.CreateSessionRequest: "create_session",
        w.CreateModelRequest: "create_model",
        w.OptimStepRequest: "optim_step",
        w.SaveWeightsRequest: "save_weights",
        w.LoadWeightsRequest: "load_weights",
        w.SaveWeightsForSamplerRequest: "save_weights_for_sampler",
        w.RetrieveFutureRequest: "retrieve_future",
    }
    for ours, reference, extra_body in cases:
        body = {**_fw_dump(reference), **extra_body}
        _same_json(w.encode_request(ours), body)
        decoded = w.decode_request(endpoints[type(ours)], body)
        if isinstance(ours, w.OptimStepRequest):
            assert w.encode_request(decoded) == w.encode_request(ours)
        else:
            assert decoded == ours


def test_sampling_bodies_equal_tinker() -> None:
    prompt = tinker.ModelInput.from_ints([1, 2, 3])
    params = tinker.SamplingParams(max_tokens=8, stop=[13], temperature=0.5)
    ours = w.SampleRequest(
        prompt=prompt,
        num_samples=2,
        sampling_params=params,
        sampling_session_id="ss",
        seq_id=1,
        prompt_logprobs=True,
        topk_prompt_logprobs=3,
    )
    reference = tinker.types.SampleRequest(
        sampling_session_id="ss",
        seq_id=1,
        num_samples=2,
        prompt=prompt,
        sampling_params=params,
        prompt_logprobs=True,
        topk_prompt_logprobs=3,
        topk_sample_logprobs=0,
        prompt_alt_tokens_k=0,
        record_stability_info=False,
    )
    _same_json(w.encode_request(ours), reference.model_dump(exclude_none=True, mode="json"))
    session = tinker.types.CreateSamplingSessionRequest(
        session_id="s", sampling_session_seq_id=0, base_model="b"
    )
    _same_json(
        w.encode_request(
            w.CreateSamplingSessionRequest(
                session_id="s", sampling_session_seq_id=0, base_model="b"
            )
        ),
        session.model_dump(exclude_none=True, mode="json"),
    )


def test_decode_accepts_what_tinker_038_sends() -> None:
    t = tinker.types

    def dump(model: Any) -> Any:
        return w.loads(w.dumps(model.model_dump(exclude_none=True, mode="json")))

    session = w.decode_request(
        "create_session",
        dump(
            t.CreateSessionRequest(
                tags=["x"], user_metadata=None, sdk_version="0.38.0", display_name="run"
            )
        ),
    )
    assert session == w.CreateSessionRequest(tags=["x"], sdk_version="0.38.0")
    model = w.decode_request(
        "create_model",
        dump(
            t.CreateModelRequest(
                session_id="s",
                model_seq_id=0,
                base_model="b",
                lora_config=t.LoraConfig(rank=8, seed=1),
            )
        ),
    )
    assert model == w.CreateModelRequest(
        session_id="s", model_seq_id=0, base_model="b", lora_rank=8, lora_seed=1
    )
    optim = w.decode_request(
        "optim_step",
        dump(
            t.OptimStepRequest(
                optim_params=t.AdamParams(learning_rate=0.01), model_id="m", seq_id=2
            )
        ),
    )
    assert isinstance(optim, w.OptimStepRequest)
    assert optim.adam_params == t.AdamParams(learning_rate=0.01)
    save = w.decode_request(
        "save_weights",
        dump(t.SaveWeightsRequest(model_id="m", path="p", seq_id=3, user_metadata={"a": "b"})),
    )
    assert save == w.SaveWeightsRequest(
        model_id="m", seq_id=3, path="p", user_metadata={"a": "b"}
    )
    sampler = w.decode_request(
        "save_weights_for_sampler",
        dump(
            t.SaveWeightsForSamplerRequest(
                model_id="m", sampling_session_seq_id=1, seq_id=4, user_metadata={"a": "b"}
            )
        ),
    )
    assert sampler == w.SaveWeightsForSamplerRequest(
        model_id="m", seq_id=4, sampling_session_seq_id=1
    )
    # Loading into a new model: the fields both sides name, and tinker's optimizer_config.
    new_model: dict[str, Any] = {
        "session_id": "s",
        "model_seq_id": 2,
        "base_model": "b",
        "path": "tinker://run/weights/ckpt",
        "optimizer": True,
        "user_metadata": {"k": "v"},
    }
    create_via_load = w.decode_request(
        "load_weights",
        dump(
            t.LoadWeightsRequest(
                **new_model, optimizer_config=t.optimizer.AdamOptimizerConfig()
            )
        ),
    )
    assert create_via_load == w.LoadWeightsRequest(**new_model)
    target = t.TensorData.from_torch_sparse(torch.tensor([[-1, 5], [-1, -1]]), pad_value=-1)
    sample = w.decode_request(
        "asample",
        dump(
            t.SampleRequest(
                prompt=tinker.ModelInput.from_ints([1, 2, 3]),
                sampling_params=t.SamplingParams(max_tokens=3),
                sampling_session_id="ss",
                seq_id=0,
                prompt_logprobs=False,
                target_prompt_logprobs=tinker.lib.public_interfaces.sampling_client._tensor_data_to_model(
                    target
                ),
            )
        ),
    )
    assert isinstance(sample, w.SampleRequest)
    assert sample.target_prompt_logprobs is not None
    assert sample.target_prompt_logprobs.to_numpy().tolist() == [[-1, 5], [-1, -1]]


def test_unknown_fields_are_ignored() -> None:
    body = _fb_body(_good_datum_json(), comms="v2", future_field={"x": 1})
    body["forward_backward_input"]["surprise"] = [1]
    body["forward_backward_input"]["data"][0]["extra"] = True
    body["forward_backward_input"]["data"][0]["model_input"]["routing_matrices"] = ["AAEC"]
    body["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]["note"] = "x"
    back = w.decode_request("forward_backward", body)
    assert isinstance(back, w.ForwardRequest)
    assert back.comms == "v2"
    optim = {
        "adam_params": {"learning_rate": 0.1, "future": 1},
        "model_id": "m",
        "seq_id": 1,
        "optimizer_config": {"type": "adamw"},
    }
    assert isinstance(w.decode_request("optim_step", optim), w.OptimStepRequest)


# --------------------------------------------------------------------------- bad input


def _with(path: Sequence[str | int], value: Any, body: Any = None) -> Any:
    body = _fb_body(_good_datum_json()) if body is None else body
    node = body
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


_DELETE = object()
_D = ("forward_backward_input", "data", 0)
_W = (*_D, "loss_fn_inputs", "weights")
_T = (*_D, "loss_fn_inputs", "target_tokens")
_TOK = (*_D, "model_input", "chunks", 0, "tokens")
_P = "forward_backward_input.data[0]"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ((*_W, "dtype"), "float64", f"{_P}.loss_fn_inputs.weights.dtype"),
        ((*_W, "dtype"), _DELETE, f"{_P}.loss_fn_inputs.weights.dtype"),
        ((*_W, "shape"), [4], f"{_P}.loss_fn_inputs.weights.shape"),
        ((*_W, "shape"), [3, -1], f"{_P}.loss_fn_inputs.weights.shape[1]"),
        ((*_W, "shape"), [True, 3], f"{_P}.loss_fn_inputs.weights.shape[0]"),
        ((*_W, "data"), [0.0, "1", 1.0], f"{_P}.loss_fn_inputs.weights.data[1]"),
        ((*_W, "data"), [0.0, None, 1.0], f"{_P}.loss_fn_inputs.weights.data[1]"),
        ((*_W, "data"), [0.0, True, 1.0], f"{_P}.loss_fn_inputs.weights.data[1]"),
        ((*_W, "data"), [[0.0], [1.0], [1.0]], f"{_P}.loss_fn_inputs.weights.data[0]"),
        ((*_W, "data"), [0.0, 1e300, 1.0], f"{_P}.loss_fn_inputs.weights.data[1]"),
        ((*_W, "data"), "abc", f"{_P}.loss_fn_inputs.weights.data"),
        ((*_T, "data"), [1, 2.5, 3], f"{_P}.loss_fn_inputs.target_tokens.data[1]"),
        ((*_T, "data"), [1, False, 3], f"{_P}.loss_fn_inputs.target_tokens.data[1]"),
        ((*_T, "data"), [1, 2**63, 3], f"{_P}.loss_fn_inputs.target_tokens.data"),
        ((*_T,), [1, 2, 3], f"{_P}.loss_fn_inputs.target_tokens"),
        ((*_TOK, 1), -4, f"{_P}.model_input.chunks[0].tokens[1]"),
        ((*_TOK, 2), 7.0, f"{_P}.model_input.chunks[0].tokens[2]"),
        ((*_TOK, 2), True, f"{_P}.model_input.chunks[0].tokens[2]"),
        ((*_TOK, 2), 2**31, f"{_P}.model_input.chunks[0].tokens[2]"),
        ((*_D, "model_input", "chunks", 0, "type"), "dmel", f"{_P}.model_input.chunks[0].type"),
        ((*_D, "model_input"), _DELETE, f"{_P}.model_input"),
        (("forward_backward_input", "data"), [], "forward_backward_input.data"),
        (("forward_backward_input", "loss_fn"), 3, "forward_backward_input.loss_fn"),
        (
            ("forward_backward_input", "loss_fn_config"),
            {"a": [1]},
            "forward_backward_input.loss_fn_config.a",
        ),
        (
            ("forward_backward_input", "loss_fn_config"),
            {"a": 1e309 * 0},
            "forward_backward_input.loss_fn_config.a",
        ),
        (("seq_id",), True, "seq_id"),
        (("seq_id",), 0, "seq_id"),
        (("seq_id",), "1", "seq_id"),
        (("model_id",), _DELETE, "model_id"),
        (("model_id",), 5, "model_id"),
        (("forward_backward_input",), _DELETE, "forward_backward_input"),
        (("comms",), 2, "comms"),
    ],
)
def test_bad_forward_backward_bodies(path: Sequence[str | int], value: Any, field: str) -> None:
    _expect_error(_with(path, value), field)


@pytest.mark.parametrize(
    ("csr", "field_suffix"),
    [
        ({"sparse_crow_indices": [0, 1, 3]}, "sparse_col_indices"),
        (
            {"sparse_crow_indices": [0, 2, 1, 3], "sparse_col_indices": [0, 1, 2]},
            "sparse_crow_indices",
        ),
        (
            {"sparse_crow_indices": [0, 1, 2, 3], "sparse_col_indices": [0, 4, 1]},
            "sparse_col_indices[1]",
        ),
        (
            {"sparse_crow_indices": [0, 1, 2], "sparse_col_indices": [0, 1, 2]},
            "sparse_crow_indices",
        ),
        (
            {"sparse_crow_indices": [1, 1, 2, 3], "sparse_col_indices": [0, 1, 2]},
            "sparse_crow_indices",
        ),
        (
            {"sparse_crow_indices": [0, 0, 0, 3], "sparse_col_indices": [2, 1, 3]},
            "sparse_col_indices",
        ),
        (
            {"sparse_crow_indices": [0, 0, 0, 3], "sparse_col_indices": [1, 1, 3]},
            "sparse_col_indices",
        ),
        ({"sparse_crow_indices": [0, 1, 2, 3], "sparse_col_indices": [0, 1]}, "sparse_col_indices"),
        ({"shape": [12], "sparse_crow_indices": [0, 3], "sparse_col_indices": [0, 1, 2]}, "shape"),
        (
            {
                "shape": [3, 2**40],
                "sparse_crow_indices": [0, 1, 2, 3],
                "sparse_col_indices": [0, 1, 2],
            },
            "",
        ),
    ],
)
def test_bad_csr(csr: dict[str, Any], field_suffix: str) -> None:
    tensor = {"data": [1.0, 2.0, 3.0], "dtype": "float32", "shape": [3, 4], **csr}
    field = f"{_P}.loss_fn_inputs.weights" + (f".{field_suffix}" if field_suffix else "")
    _expect_error(_with(_W, tensor), field)


def test_sparse_expansion_budget_is_per_body() -> None:
    rows = 1 << 12
    cols = (w.MAX_DENSE_ELEMENTS // rows) // 2 + 1  # two of these exceed the budget
    csr = {
        "data": [],
        "dtype": "int64",
        "shape": [rows, cols],
        "sparse_crow_indices": [0] * (rows + 1),
        "sparse_col_indices": [],
    }
    datum = _good_datum_json()
    datum["loss_fn_inputs"] = {"a": csr, "b": csr}
    _expect_error(_fb_body(datum), f"{_P}.loss_fn_inputs.b")
    datum["loss_fn_inputs"] = {"a": csr}
    assert isinstance(w.decode_request("forward_backward", _fb_body(datum)), w.ForwardRequest)


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("optim_step", {"model_id": "m", "seq_id": 1}, "adam_params"),
        (
            "optim_step",
            {"optimizer_params": {"type": "dimuon"}, "model_id": "m", "seq_id": 1},
            "optimizer_params",
        ),
        (
            "optim_step",
            {"adam_params": {"beta1": 1.0}, "model_id": "m", "seq_id": 1},
            "adam_params.beta1",
        ),
        (
            "optim_step",
            {"adam_params": {"learning_rate": -1}, "model_id": "m", "seq_id": 1},
            "adam_params.learning_rate",
        ),
        (
            "optim_step",
            {"adam_params": {"eps": "x"}, "model_id": "m", "seq_id": 1},
            "adam_params.eps",
        ),
        (
            "optim_step",
            {
                "adam_params": {},
                "model_id": "m",
                "seq_id": 1,
                "grad_accumulation_normalization": "x",
            },
            "grad_accumulation_normalization",
        ),
        (
            "optim_step",
            {"adam_params": {"emit_grad_norm_metrics": "loud"}, "model_id": "m", "seq_id": 1},
            "adam_params.emit_grad_norm_metrics",
        ),
        ("optim_step", {"adam_params": {}, "model_id": "m", "seq_id": 1, "type": "x"}, "type"),
        ("create_model", {"session_id": "s", "model_seq_id": 0}, "base_model"),
        (
            "create_model",
            {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {"rank": -1}},
            "lora_config.rank",
        ),
        (
            "create_model",
            {
                "session_id": "s",
                "model_seq_id": 0,
                "base_model": "b",
                "lora_config": {"rank": 2**40},
            },
            "lora_config.rank",
        ),
        (
            "create_model",
            {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {}},
            "lora_config.rank",
        ),
        (
            "create_model",
            {"session_id": "s", "model_seq_id": 0, "base_model": "b", "user_metadata": {"a": 1}},
            "user_metadata.a",
        ),
        ("create_session", {"tags": "a"}, "tags"),
        ("save_weights", {"model_id": "m", "seq_id": 1}, "path"),
        (
            "save_weights",
            {"model_id": "m", "seq_id": 1, "path": "p", "ttl_seconds": 0},
            "ttl_seconds",
        ),
        ("load_weights", {"model_id": "m", "seq_id": 1, "path": "p"}, "optimizer"),
        ("load_weights", {"path": "p", "optimizer": False}, "model_id"),
        (
            "load_weights",
            {"session_id": "s", "path": "p", "optimizer": False},
            "model_seq_id",
        ),
        (
            "save_weights_for_sampler",
            {"model_id": "m", "seq_id": 1, "checkpoint_type": "full"},
            "checkpoint_type",
        ),
        (
            "save_weights_for_sampler",
            {"model_id": "m", "seq_id": 1, "checkpoint_type": "base", "export_precision": "bf16"},
            "export_precision",
        ),
        ("retrieve_future", {"request_id": 7}, "request_id"),
        ("retrieve_future", {"request_id": "r", "allow_metadata_only": 1}, "allow_metadata_only"),
        ("asample", {"prompt": {"chunks": []}}, "sampling_params"),
        (
            "asample",
            {"prompt": {"chunks": []}, "sampling_params": {"top_p": 0}},
            "sampling_params.top_p",
        ),
        (
            "asample",
            {"prompt": {"chunks": []}, "sampling_params": {}, "num_samples": 0},
            "num_samples",
        ),
        (
            "asample",
            {
                "prompt": {"chunks": [{"type": "image", "data": "!!", "format": "png"}]},
                "sampling_params": {},
            },
            "prompt.chunks[0].data",
        ),
        (
            "asample",
            {
                "prompt": {"chunks": [{"type": "image", "data": "AAAA", "format": "gif"}]},
                "sampling_params": {},
            },
            "prompt.chunks[0].format",
        ),
        ("create_sampling_session", {"session_id": "s"}, "sampling_session_seq_id"),
        ("forward", [1, 2], ""),
    ],
)
def test_bad_bodies(endpoint: str, body: Any, field: str) -> None:
    _expect_error(body, field, endpoint)


# --------------------------------------------------------------------------- futures


def test_future_outcomes_in_reference_order() -> None:
    assert w.decode_future_outcome(
        {"type": "try_again", "request_id": "r", "queue_state": "paused_capacity", "error": "x"}
    ) == w.TryAgain("r", "paused_capacity")
    assert w.decode_future_outcome({"type": "try_again"}) == w.TryAgain("", None)
    paused = w.TryAgain("r", "paused_capacity", "the operator paused the trainer")
    assert w.encode_future_outcome(paused)["queue_state_reason"] == paused.queue_state_reason
    assert w.decode_future_outcome(w.encode_future_outcome(paused)) == paused
    assert "queue_state_reason" not in w.encode_future_outcome(w.TryAgain("r"))
    assert w.decode_future_outcome(
        {"type": "try_again", "request_id": "r", "queue_state_reason": 7}
    ) == w.TryAgain("r", None, None)
    assert w.decode_future_outcome(
        {"status": "complete_metadata", "response_payload_size": 7, "error": None}
    ) == w.CompleteMetadata(7)
    assert w.decode_future_outcome({"error": None}) == w.FutureFailed("unknown error", "unknown")
    assert w.decode_future_outcome(
        {"error": "bad", "category": "user", "error_class": "ValueError"}
    ) == w.FutureFailed("bad", "user", "ValueError")
    assert w.decode_future_outcome({"error": "x", "category": "USER"}).category == "unknown"  # type: ignore[union-attr]
    long_class = w.decode_future_outcome(
        {"error": "x", "category": "server", "error_class": "E" * 129}
    )
    assert long_class == w.FutureFailed("x", "server", None)
    payload = {"loss_fn_output_type": "T", "loss_fn_outputs": [], "metrics": {}}
    assert w.decode_future_outcome(payload) == w.FutureResult(payload)
    with pytest.raises(w.WireError):
        w.decode_future_outcome([1])
    with pytest.raises(w.WireError):
        w.decode_future_outcome({"status": "complete_metadata", "response_payload_size": -1})


def test_future_outcome_encode_round_trip() -> None:
    outcomes: list[w.FutureOutcome] = [
        w.TryAgain("r"),
        w.TryAgain("r", None),
        w.CompleteMetadata(10),
        w.FutureFailed("boom", "server", "RuntimeError"),
        w.FutureFailed("boom"),
        w.FutureResult({"metrics": {"grad_norm:global": 1.0}}),
    ]
    for outcome in outcomes:
        assert (
            w.decode_future_outcome(_wire_round_trip(w.encode_future_outcome(outcome))) == outcome
        )
    assert w.encode_future_outcome(w.FutureFailed("x", "weird"))["category"] == "unknown"
    for payload in ({"error": None}, {"type": "try_again"}, {"status": "complete_metadata"}, [1]):
        with pytest.raises(w.WireError):
            w.encode_future_outcome(w.FutureResult(payload))


def test_future_ack_round_trip() -> None:
    ack = w.FutureAck(request_id="r", model_id="m", sample_sequence_ids=["a", "b"])
    back = w.decode_future_ack(_wire_round_trip(w.encode_future_ack(ack)))
    assert (back.request_id, back.model_id, list(back.sample_sequence_ids or [])) == (
        "r",
        "m",
        ["a", "b"],
    )
    assert w.encode_future_ack(w.FutureAck(request_id="r")) == {"request_id": "r"}
    with pytest.raises(w.WireError):
        w.decode_future_ack({"request_id": 1})


# --------------------------------------------------------------------------- results


def _output(n: int = 2, seed: int = 0) -> tinker.ForwardBackwardOutput:
    rng = np.random.default_rng(seed)
    return tinker.ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn",
        loss_fn_outputs=[
            {
                "logprobs": _td(-rng.random(5 + i), "float32"),
                "ids": _td(rng.integers(0, 9, (2, 3))),
            }
            for i in range(n)
        ],
        metrics={"loss:sum": 2.5, "tokens:sum": 3.0, "lr:unique": 1e-5},
    )


@pytest.mark.parametrize("v2", [False, True])
def test_forward_backward_output_round_trip(v2: bool) -> None:
    output = _output()
    back = w.decode_forward_backward_output(
        _wire_round_trip(w.encode_forward_backward_output(output, v2=v2))
    )
    assert back.loss_fn_output_type == "TorchLossReturn"
    assert back.metrics == output.metrics
    assert len(back.loss_fn_outputs) == 2
    for a, b in zip(output.loss_fn_outputs, back.loss_fn_outputs, strict=True):
        for key in a:
            _assert_tensor_equal(a[key], b[key])
            assert isinstance(b[key].to_numpy(), np.ndarray)


def test_forward_backward_output_is_read_by_the_fireworks_models() -> None:
    from fireworks.training.sdk._core.lib._pydantic_conv import deserialize_json_response
    from fireworks.training.sdk._core.lib.comms import _CommsV2ForwardBackwardOutput

    fw = _fireworks()
    output = _output()
    for v2 in (False, True):
        body = orjson.loads(w.dumps(w.encode_forward_backward_output(output, v2=v2)))
        parsed = deserialize_json_response(body, fw.ForwardBackwardOutput)
        _CommsV2ForwardBackwardOutput.model_validate(body)
        got = parsed.loss_fn_outputs[1]["logprobs"].to_numpy()
        assert np.array_equal(got, output.loss_fn_outputs[1]["logprobs"].to_numpy())


def test_forward_backward_output_densifies_csr() -> None:
    dense = torch.zeros(3, 5)
    dense[1, 2] = 0.5
    output = tinker.ForwardBackwardOutput(
        loss_fn_output_type="T",
        loss_fn_outputs=[{"g": tinker.TensorData.from_torch_sparse(dense)}],
        metrics={},
    )
    body = w.encode_forward_backward_output(output)
    assert set(body["loss_fn_outputs"][0]["g"]) == {"data", "dtype", "shape"}
    back = w.decode_forward_backward_output(_wire_round_trip(body))
    assert np.array_equal(back.loss_fn_outputs[0]["g"].to_numpy(), dense.numpy())


@pytest.mark.parametrize(
    ("metrics", "outputs", "field"),
    [
        ({"loss": 1.0}, [], "metrics.loss"),
        ({"a:b:sum": 1.0}, [], "metrics.a:b:sum"),
        ({"loss:median": 1.0}, [], "metrics.loss:median"),
        ({":sum": 1.0}, [], "metrics.:sum"),
        ({"loss:sum": math.nan}, [], "metrics.loss:sum"),
        ({}, [{"x": _td([1.0, math.inf], "float32")}], "loss_fn_outputs[0].x.data[1]"),
    ],
)
def test_bad_results_refused(
    metrics: dict[str, float], outputs: list[dict[str, tinker.TensorData]], field: str
) -> None:
    output = tinker.ForwardBackwardOutput(
        loss_fn_output_type="T", loss_fn_outputs=outputs, metrics=metrics
    )
    with pytest.raises(w.WireError) as info:
        w.encode_forward_backward_output(output)
    assert info.value.field == field


def test_validate_metric_keys_raises_value_error() -> None:
    w.validate_metric_keys({"loss:sum": 1.0, "x:hash_unordered": 2.0})
    with pytest.raises(ValueError, match="loss"):
        w.validate_metric_keys({"loss": 1.0})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"loss_fn_outputs": [], "metrics": {}}, "loss_fn_output_type"),
        ({"loss_fn_output_type": "T", "metrics": {}}, "loss_fn_outputs"),
        ({"loss_fn_output_type": "T", "loss_fn_outputs": []}, "metrics"),
        (
            {"loss_fn_output_type": "T", "loss_fn_outputs": [], "metrics": {"a:sum": "1"}},
            "metrics.a:sum",
        ),
        (
            {"loss_fn_output_type": "T", "loss_fn_outputs": [], "metrics": {"a:sum": True}},
            "metrics.a:sum",
        ),
        (
            {
                "loss_fn_output_type": "T",
                "loss_fn_outputs": [{"lp": {"data": [1], "dtype": "bf16"}}],
                "metrics": {},
            },
            "loss_fn_outputs[0].lp.dtype",
        ),
    ],
)
def test_bad_results_refused_on_decode(body: Any, field: str) -> None:
    with pytest.raises(w.WireError) as info:
        w.decode_forward_backward_output(body)
    assert info.value.field == field


def _chunk_output(n: int, metrics: dict[str, float]) -> tinker.ForwardBackwardOutput:
    return tinker.ForwardBackwardOutput(
        loss_fn_output_type="T",
        loss_fn_outputs=[{"logprobs": _td([float(i)], "float32")} for i in range(n)],
        metrics=metrics,
    )


def test_combine_outputs_reductions() -> None:
    chunks = [
        _chunk_output(1, {"l:sum": 1.0, "m:mean": 1.0, "s:slack": 1.0, "a:min": 3.0,
                          "b:max": 3.0, "h:hash_unordered": 5.0, "u:unique": 0.1,
                          "z:weird": 1.0, "p:sum": 1.0}),
        _chunk_output(3, {"l:sum": 2.0, "m:mean": 3.0, "s:slack": 3.0, "a:min": 1.0,
                          "b:max": 4.0, "h:hash_unordered": 6.0, "u:unique": 0.2,
                          "z:weird": 2.0, "extra:sum": 1.0}),
        _chunk_output(0, {"l:sum": 4.0, "m:mean": 100.0, "s:slack": 0.0, "a:min": 2.0,
                          "b:max": 1.0, "h:hash_unordered": 7.0, "u:unique": 0.3,
                          "z:weird": 3.0}),
    ]  # fmt: skip
    combined = w.combine_outputs(chunks)
    assert combined.loss_fn_output_type == "T"
    assert [o["logprobs"].to_numpy()[0] for o in combined.loss_fn_outputs] == [0.0, 0.0, 1.0, 2.0]
    assert combined.metrics == {
        "l:sum": 7.0,
        "m:mean": (1.0 * 1 + 3.0 * 3) / 4,
        "s:slack": 3.0 - (1.0 * 1 + 3.0 * 3) / 4,
        "a:min": 1.0,
        "b:max": 4.0,
        "h:hash_unordered": hash((5, 6, 7)),
        "u:unique": 0.1,
        "u:unique_1": 0.2,
        "u:unique_2": 0.3,
    }
    # Same as the reference client's combiner (its ForwardBackwardOutput is its own class).
    from fireworks.training.sdk._core.lib.chunked_fwdbwd_helpers import (
        combine_fwd_bwd_output_results,
    )

    fw = _fireworks()
    reference = combine_fwd_bwd_output_results(
        [
            fw.ForwardBackwardOutput(
                loss_fn_output_type=c.loss_fn_output_type,
                loss_fn_outputs=c.loss_fn_outputs,
                metrics=c.metrics,
            )
            for c in chunks
        ]
    )
    assert reference.metrics == combined.metrics


def test_combine_outputs_edge_cases() -> None:
    assert w.combine_outputs([]).metrics == {}
    assert w.combine_outputs(
        [_chunk_output(0, {"m:mean": 2.0}), _chunk_output(0, {"m:mean": 4.0})]
    ).metrics == {"m:mean": 3.0}
    with pytest.raises(w.WireError):
        w.combine_outputs([_chunk_output(1, {"loss": 1.0})])


# --------------------------------------------------------------------------- chunking


def test_chunk_data_datum_limit() -> None:
    data = [_datum([1]) for _ in range(2049)]
    chunks = w.chunk_data(data)
    assert [len(c) for c in chunks] == [1024, 1024, 1]
    assert [d for c in chunks for d in c] == data
    assert w.chunk_data([]) == []


def test_chunk_data_byte_limit() -> None:
    # 10 bytes per token + 10 per stored loss_fn_inputs value: 100 tokens + 100 weights = 2000.
    def datum() -> tinker.Datum:
        return _datum([1] * 100, weights=_td(np.ones(100), "float32"))

    assert [len(c) for c in w.chunk_data([datum() for _ in range(5)], max_bytes=4000)] == [2, 2, 1]
    assert [len(c) for c in w.chunk_data([datum() for _ in range(5)], max_bytes=3999)] == [1] * 5
    big = _datum([1] * 1000)  # 10,000 estimated bytes, over the limit on its own
    assert [len(c) for c in w.chunk_data([datum(), big, datum()], max_bytes=4000)] == [1, 1, 1]
    image = tinker.Datum(
        model_input=tinker.ModelInput(
            chunks=[ImageChunk(data=bytes(3000), format="png", expected_tokens=1)]
        )
    )
    assert [len(c) for c in w.chunk_data([image, datum()], max_bytes=4999)] == [1, 1]
    assert [len(c) for c in w.chunk_data([image, datum()], max_bytes=5000)] == [2]
    sparse = torch.zeros(100, 100)
    sparse[0, 0] = 1.0  # CSR: one stored value
    csr = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1]),
        loss_fn_inputs={"weights": tinker.TensorData.from_torch_sparse(sparse)},
    )
    assert w.chunk_data([csr, csr], max_bytes=40) == [[csr, csr]]


# --------------------------------------------------------------------------- sampling results


def _sample_response() -> tinker.SampleResponse:
    topk = TopkLogprobs(
        token_ids=np.array([[0, 0], [5, 6], [7, 0]], dtype=np.int32),
        logprobs=np.array(
            [[-99999.0, -99999.0], [-0.5, -1.5], [-0.25, -99999.0]], dtype=np.float32
        ),
    )
    return tinker.SampleResponse(
        sequences=[
            tinker.SampledSequence(
                stop_reason="stop",
                sequence_id="seq-0",
                tokens_np=np.array([4, 5, 6], dtype=np.int32),
                logprobs_np=np.array([-0.1, -0.2, -0.3], dtype=np.float32),
            ),
            tinker.SampledSequence(
                stop_reason="length", sequence_id="seq-1", tokens_np=np.array([], dtype=np.int32)
            ),
        ],
        prompt_logprobs_np=np.array([np.nan, -1.25, -2.5], dtype=np.float32),
        topk_prompt_logprobs_np=topk,
        prompt_cache_hit_tokens=2,
        target_prompt_logprobs=_td([[-0.5], [0.0]], "float32"),
        prompt_alt_tokens=PromptAltTokens(
            tokens=_td([[1, 2], [3, 4]]), logprobs=_td([[-1.0, -2.0], [-3.0, -4.0]], "float32")
        ),
    )


def test_sample_response_json_round_trip() -> None:
    response = _sample_response()
    body = _wire_round_trip(w.encode_sample_response(response))
    assert body["prompt_logprobs"][0] is None
    assert body["topk_prompt_logprobs"] == [None, [[5, -0.5], [6, -1.5]], [[7, -0.25]]]
    back = w.decode_sample_response(body)
    assert [s.tokens for s in back.sequences] == [[4, 5, 6], []]
    assert [s.sequence_id for s in back.sequences] == ["seq-0", "seq-1"]
    assert [s.stop_reason for s in back.sequences] == ["stop", "length"]
    assert back.sequences[0].logprobs == response.sequences[0].logprobs
    assert back.sequences[1].logprobs is None
    assert back.prompt_logprobs == response.prompt_logprobs
    assert back.topk_prompt_logprobs == response.topk_prompt_logprobs
    assert back.prompt_cache_hit_tokens == 2
    assert back.target_prompt_logprobs is not None and back.prompt_alt_tokens is not None
    _assert_tensor_equal(back.prompt_alt_tokens.tokens, _td([[1, 2], [3, 4]]))


def test_sample_response_json_is_read_by_the_fireworks_models() -> None:
    from fireworks.training.sdk._core.lib._pydantic_conv import deserialize_json_response

    fw = _fireworks()
    body = orjson.loads(w.dumps(w.encode_sample_response(_sample_response())))
    parsed = deserialize_json_response(body, fw.SampleResponse)
    assert parsed.sequences[0].tokens == [4, 5, 6]
    assert parsed.prompt_logprobs == [None, -1.25, -2.5]
    assert parsed.topk_prompt_logprobs == [None, [(5, -0.5), (6, -1.5)], [(7, -0.25)]]


def test_sample_response_proto_is_read_by_tinker() -> None:
    from tinker.proto.response_conv import deserialize_sample_response

    response = _sample_response()
    back = deserialize_sample_response(w.encode_sample_response_proto(response))
    assert [s.tokens for s in back.sequences] == [[4, 5, 6], []]
    assert [s.stop_reason for s in back.sequences] == ["stop", "length"]
    assert back.sequences[0].logprobs == response.sequences[0].logprobs
    assert back.prompt_logprobs == response.prompt_logprobs
    assert back.topk_prompt_logprobs == response.topk_prompt_logprobs
    assert back.prompt_cache_hit_tokens == 2
    assert back.target_prompt_logprobs is not None and back.prompt_alt_tokens is not None
    _assert_tensor_equal(back.target_prompt_logprobs, _td([[-0.5], [0.0]], "float32"))
    _assert_tensor_equal(back.prompt_alt_tokens.logprobs, response.prompt_alt_tokens.logprobs)  # type: ignore[union-attr]


def test_forward_backward_output_proto_is_read_by_tinker() -> None:
    from tinker.proto.response_conv import deserialize_forward_backward_output

    output = _output(3)
    # Another trailing shape for "ids" starts a second ArrayRecord.
    output.loss_fn_outputs.append(
        {"logprobs": _td([-1.0], "float32"), "ids": _td(np.ones((2, 4)), "int64")}
    )
    back = deserialize_forward_backward_output(w.encode_forward_backward_output_proto(output))
    assert back.loss_fn_output_type == "TorchLossReturn"
    assert back.metrics == output.metrics
    assert len(back.loss_fn_outputs) == 4
    for a, b in zip(output.loss_fn_outputs, back.loss_fn_outputs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            _assert_tensor_equal(a[key], b[key])


def test_forward_backward_output_proto_needs_the_same_fields() -> None:
    output = tinker.ForwardBackwardOutput(
        loss_fn_output_type="T",
        loss_fn_outputs=[{"a": _td([1.0], "float32")}, {"b": _td([1.0], "float32")}],
        metrics={},
    )
    with pytest.raises(w.WireError) as info:
        w.encode_forward_backward_output_proto(output)
    assert info.value.field == "loss_fn_outputs[1]"


@pytest.mark.parametrize("v2", [True, False])
def test_a_long_weights_mask_is_written_as_orjson_writes_it(v2: bool) -> None:
    mask = np.ones(1000, dtype=np.float32)
    mask[:250] = 0.0
    mask[600:610] = 0.0
    tensor = tinker.TensorData.from_numpy(mask)
    body = w.dumps(w.encode_tensor(tensor, v2=v2))
    expected = orjson.dumps(
        {"data": mask if v2 else mask.astype(np.float64), "dtype": "float32", "shape": [1000]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    assert body == expected
    assert w.decode_tensor(w.loads(body)).to_numpy().tolist() == mask.tolist()


@pytest.mark.parametrize("odd", [-0.0, 0.5, 2.0])
def test_an_array_that_is_not_a_mask_is_written_as_before(odd: float) -> None:
    values = np.ones(1000, dtype=np.float32)
    values[7] = odd
    body = w.dumps(w.encode_tensor(tinker.TensorData.from_numpy(values), v2=True))
    assert body == orjson.dumps(
        {"data": values, "dtype": "float32", "shape": [1000]}, option=orjson.OPT_SERIALIZE_NUMPY
    )
