"""`decode_request`: request bodies, validated field by field, to the request classes
of `firetitan._wire.requests`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import tinker

from firetitan._wire import requests as rq
from firetitan._wire._json import (
    _INT64_MAX,
    WireError,
    _bool,
    _check_type,
    _float,
    _int,
    _key,
    _list,
    _obj,
    _opt_bool,
    _opt_int,
    _opt_str,
    _required,
    _str,
    _str_dict,
    _token_ids,
    _type_name,
)
from firetitan._wire.tensors import (
    _Budget,
    _decode_datum,
    _decode_tensor_as_sent,
    decode_model_input,
)

__all__ = ["DECODERS", "RequestDecoder", "decode_request"]

_MAX_NUM_SAMPLES: Final = 1 << 16
_MAX_LORA_RANK: Final = 1 << 16  # also bounds projection_head_dim

_CHECKPOINT_TYPES: Final = ("base", "delta", "merged_base")
_EXPORT_PRECISIONS: Final = ("source", "bf16", "nvfp4", "mxfp8", "fp8_block128")
_GRAD_ACC_NORMALIZATIONS: Final = ("none", "num_loss_tokens", "num_sequences")
_GRAD_NORM_MODES: Final = ("off", "basic", "detailed")


# --------------------------------------------------------------------------- request decoders


def _decode_create_session(body: dict[str, Any], _: _Budget) -> rq.CreateSessionRequest:
    _check_type(body, "create_session", "")
    tags_raw = body.get("tags")
    tags = [] if tags_raw is None else _list(tags_raw, "tags")
    for i, tag in enumerate(tags):
        _str(tag, f"tags[{i}]", allow_empty=True)
    metadata_raw = body.get("user_metadata")
    metadata = {} if metadata_raw is None else _str_dict(metadata_raw, "user_metadata")
    version = body.get("sdk_version")
    return rq.CreateSessionRequest(
        tags=list(tags),
        user_metadata=metadata,
        sdk_version="0.23.0" if version is None else _str(version, "sdk_version"),
    )


def _decode_create_model(body: dict[str, Any], _: _Budget) -> rq.CreateModelRequest:
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
        return rq.CreateModelRequest(
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
    return rq.CreateModelRequest(
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
) -> rq.ForwardRequest:
    key = "forward_input" if forward_only else "forward_backward_input"
    inner = _obj(_required(body, key, ""), key)
    raw_data = _list(_required(inner, "data", key), _key(key, "data"))
    if not raw_data:
        raise WireError(_key(key, "data"), "must hold at least one datum")
    data = [_decode_datum(d, f"{key}.data[{i}]", budget) for i, d in enumerate(raw_data)]
    comms = body.get("comms")
    return rq.ForwardRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        data=data,
        loss_fn=_str(_required(inner, "loss_fn", key), _key(key, "loss_fn")),
        loss_fn_config=_loss_fn_config(inner.get("loss_fn_config"), _key(key, "loss_fn_config")),
        forward_only=forward_only,
        comms=None if comms is None else _str(comms, "comms"),
    )


def _decode_forward(body: dict[str, Any], budget: _Budget) -> rq.ForwardRequest:
    return _decode_forward_like(body, budget, forward_only=True)


def _decode_forward_backward(body: dict[str, Any], budget: _Budget) -> rq.ForwardRequest:
    return _decode_forward_like(body, budget, forward_only=False)


def _decode_optim_step(body: dict[str, Any], _: _Budget) -> rq.OptimStepRequest:
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
    return rq.OptimStepRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        adam_params=params,
        grad_accumulation_normalization=norm,
        emit_grad_norm_metrics=grad_norm,
    )


def _decode_save_weights(body: dict[str, Any], _: _Budget) -> rq.SaveWeightsRequest:
    _check_type(body, "save_weights", "")
    return rq.SaveWeightsRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        path=_str(_required(body, "path", ""), "path"),
        overwrite=_opt_bool(body, "overwrite", "", False),
        ttl_seconds=_opt_int(body, "ttl_seconds", "", lo=1),
        user_metadata=None
        if body.get("user_metadata") is None
        else _str_dict(body["user_metadata"], "user_metadata"),
    )


def _decode_load_weights(body: dict[str, Any], _: _Budget) -> rq.LoadWeightsRequest:
    _check_type(body, "load_weights", "")
    path = _str(_required(body, "path", ""), "path")
    optimizer = _bool(_required(body, "optimizer", ""), "optimizer")
    if body.get("model_id") is not None or body.get("session_id") is None:
        return rq.LoadWeightsRequest(
            model_id=_model_id(body), seq_id=_seq_id(body), path=path, optimizer=optimizer
        )
    metadata_raw = body.get("user_metadata")
    return rq.LoadWeightsRequest(
        path=path,
        optimizer=optimizer,
        session_id=_str(body["session_id"], "session_id"),
        model_seq_id=_int(_required(body, "model_seq_id", ""), "model_seq_id", lo=0),
        base_model=_opt_str(body, "base_model", ""),
        user_metadata=None if metadata_raw is None else _str_dict(metadata_raw, "user_metadata"),
    )


def _opt_choice(body: dict[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
    """An optional string field that must be one of ``choices`` (case-insensitive)."""
    value = _opt_str(body, key, "")
    if value is not None:
        value = value.lower()
        if value not in choices:
            raise WireError(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _decode_save_for_sampler(body: dict[str, Any], _: _Budget) -> rq.SaveWeightsForSamplerRequest:
    _check_type(body, "save_weights_for_sampler", "")
    checkpoint_type = _opt_choice(body, "checkpoint_type", _CHECKPOINT_TYPES)
    precision = _opt_choice(body, "export_precision", _EXPORT_PRECISIONS)
    if precision is not None and checkpoint_type != "merged_base":
        raise WireError("export_precision", "only allowed with checkpoint_type 'merged_base'")
    metadata_raw = body.get("metadata")
    return rq.SaveWeightsForSamplerRequest(
        model_id=_model_id(body),
        seq_id=_seq_id(body),
        path=_opt_str(body, "path", ""),
        checkpoint_type=checkpoint_type,
        ttl_seconds=_opt_int(body, "ttl_seconds", "", lo=1),
        sampling_session_seq_id=_opt_int(body, "sampling_session_seq_id", "", lo=0),
        export_precision=precision,
        metadata=None if metadata_raw is None else dict(_obj(metadata_raw, "metadata")),
    )


def _decode_cancel_future(body: dict[str, Any], _: _Budget) -> rq.CancelFutureRequest:
    return rq.CancelFutureRequest(request_id=_str(_required(body, "request_id", ""), "request_id"))


def _decode_session_heartbeat(body: dict[str, Any], _: _Budget) -> rq.SessionHeartbeatRequest:
    _check_type(body, "session_heartbeat", "")
    return rq.SessionHeartbeatRequest(
        session_id=_str(_required(body, "session_id", ""), "session_id")
    )


def _decode_get_info(body: dict[str, Any], _: _Budget) -> rq.GetInfoRequest:
    _check_type(body, "get_info", "")
    return rq.GetInfoRequest(model_id=_str(_required(body, "model_id", ""), "model_id"))


def _decode_unload_model(body: dict[str, Any], _: _Budget) -> rq.UnloadModelRequest:
    _check_type(body, "unload_model", "")
    return rq.UnloadModelRequest(model_id=_str(_required(body, "model_id", ""), "model_id"))


def _decode_retrieve_future(body: dict[str, Any], _: _Budget) -> rq.RetrieveFutureRequest:
    return rq.RetrieveFutureRequest(
        request_id=_str(_required(body, "request_id", ""), "request_id"),
        allow_metadata_only=_opt_bool(body, "allow_metadata_only", "", False),
    )


def _decode_create_sampling_session(
    body: dict[str, Any], _: _Budget
) -> rq.CreateSamplingSessionRequest:
    _check_type(body, "create_sampling_session", "")
    return rq.CreateSamplingSessionRequest(
        session_id=_str(_required(body, "session_id", ""), "session_id"),
        sampling_session_seq_id=_int(
            _required(body, "sampling_session_seq_id", ""), "sampling_session_seq_id", lo=0
        ),
        base_model=_opt_str(body, "base_model", ""),
        model_path=_opt_str(body, "model_path", ""),
    )


def _decode_create_custom_loss(body: dict[str, Any], _: _Budget) -> rq.CreateCustomLossRequest:
    _check_type(body, "create_custom_loss", "")
    # The loss itself stays plain JSON: the trainer checks it as a whole.
    loss = {key: _required(body, key, "") for key in ("name", "inputs", "graph")}
    seq_id = _int(_required(body, "custom_loss_seq_id", ""), "custom_loss_seq_id", lo=0)
    session_id = _str(_required(body, "session_id", ""), "session_id")
    return rq.CreateCustomLossRequest(session_id=session_id, custom_loss_seq_id=seq_id, **loss)


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


def _decode_sample(body: dict[str, Any], budget: _Budget) -> rq.SampleRequest:
    _check_type(body, "sample", "")
    num_samples = body.get("num_samples")
    target_raw = body.get("target_prompt_logprobs")
    target = None
    if target_raw is not None:
        target = _decode_tensor_as_sent(target_raw, "target_prompt_logprobs", budget)
        if target.dtype != "int64" or target.shape is None or len(target.shape) != 2:
            raise WireError("target_prompt_logprobs", "expected a 2-D int64 tensor of token ids")
    return rq.SampleRequest(
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


#: Decodes one request body; the budget bounds the tensor elements of the whole body.
RequestDecoder = Callable[[dict[str, Any], _Budget], rq.Request]

#: The request decoder of each endpoint that takes a body (by `endpoints.Endpoint.name`).
DECODERS: Final[dict[str, RequestDecoder]] = {
    "create_session": _decode_create_session,
    "create_model": _decode_create_model,
    "forward": _decode_forward,
    "forward_backward": _decode_forward_backward,
    "optim_step": _decode_optim_step,
    "save_weights": _decode_save_weights,
    "load_weights": _decode_load_weights,
    "save_weights_for_sampler": _decode_save_for_sampler,
    "retrieve_future": _decode_retrieve_future,
    "cancel_future": _decode_cancel_future,
    "session_heartbeat": _decode_session_heartbeat,
    "get_info": _decode_get_info,
    "unload_model": _decode_unload_model,
    "create_sampling_session": _decode_create_sampling_session,
    "create_custom_loss": _decode_create_custom_loss,
    "asample": _decode_sample,
}


def decode_request(endpoint: str, body: Any) -> rq.Request:
    """Decode a request body for an endpoint name (``"forward"``, ``"forward_backward"``,
    ``"optim_step"``, ``"create_model"``, ...).

    ``endpoint`` may also be the path (`endpoints.Endpoint.path`). Fields the reference
    client or tinker 0.38 send that the trainer does not use (``optimizer_config``,
    ``display_name``, ``kind``, ``weights_access_token``, ...) are ignored.

    Raises:
        WireError: The body is malformed; ``field`` names the offending value.
        ValueError: ``endpoint`` names no known endpoint.
    """
    name = endpoint.strip("/").removeprefix("api/v1/")
    decoder = DECODERS.get(name)
    if decoder is None:
        raise ValueError(f"unknown endpoint {endpoint!r}")
    return decoder(_obj(body, ""), _Budget())
