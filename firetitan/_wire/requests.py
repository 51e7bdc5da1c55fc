"""The request classes, one attrs type per endpoint (`Request` is their union), and
`encode_request`, which writes each as the body the reference client sends (§3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import tinker

from firetitan._wire._json import JSON, _present
from firetitan._wire.tensors import encode_datum, encode_model_input, encode_tensor

__all__ = [
    "SESSION_HEADER",
    "CancelFutureRequest",
    "CreateCustomLossRequest",
    "CreateModelRequest",
    "CreateSamplingSessionRequest",
    "CreateSessionRequest",
    "ForwardRequest",
    "GetInfoRequest",
    "LoadWeightsRequest",
    "ModelSpec",
    "OptimStepRequest",
    "Request",
    "RetrieveFutureRequest",
    "SampleRequest",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsRequest",
    "SessionHeartbeatRequest",
    "UnloadModelRequest",
    "encode_request",
]

#: The header in which firetitan's client names its session on every request once the
#: session is open; the trainer refuses requests for another session's models.
SESSION_HEADER = "X-Firetitan-Session-Id"


# --------------------------------------------------------------------------- requests


@attrs.frozen(kw_only=True)
class CreateSessionRequest:
    """The body of the ``create_session`` endpoint (§3.2)."""

    tags: list[str] = attrs.field(factory=list)
    user_metadata: dict[str, str] = attrs.field(factory=dict)
    sdk_version: str = "0.23.0"


@attrs.frozen(kw_only=True)
class ModelSpec:
    """The model a ``create_model`` request asks for (what a trainer's engine builds).

    Attributes:
        base_model: The base model name, e.g. ``accounts/fireworks/models/qwen3-8b``.
        lora_rank: 0 for full-parameter training, otherwise the LoRA rank.
        lora_alpha: LoRA alpha; None means ``2 * rank``.
        lora_seed: Seed for the LoRA initialisation; None means the engine's seed.
        train_mlp: Put LoRA adapters on the MLP projections.
        train_attn: Put LoRA adapters on the attention projections.
        train_unembed: Put a LoRA adapter on the output (unembedding) layer.
        base_only: A frozen base model, used only with `forward` (reference logprobs).
    """

    base_model: str
    lora_rank: int = 0
    lora_alpha: int | None = None
    lora_seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    base_only: bool = False


@attrs.frozen(kw_only=True)
class CreateModelRequest(ModelSpec):
    """The body of the ``create_model`` endpoint (§3.7): the `ModelSpec`, in a session.
    ``lora_rank == 0`` is full-parameter.

    ``lora_alpha`` and ``lora_init_method`` apply to LoRA only and are not sent for
    full-parameter models. ``base_only`` creates a frozen reference model; its body
    carries no ``lora_config``.
    """

    session_id: str
    model_seq_id: int
    user_metadata: dict[str, str] | None = None
    lora_init_method: str | None = None
    projection_head_dim: int | None = None


@attrs.frozen(kw_only=True)
class ForwardRequest:
    """The body of the ``forward`` (``forward_only``) or ``forward_backward`` endpoint
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
    """The body of the ``optim_step`` endpoint (§3.11).

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
    """The body of the ``save_weights`` endpoint (§3.12), used by ``save_state``."""

    model_id: str
    seq_id: int
    path: str
    overwrite: bool = False
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


@attrs.frozen(kw_only=True)
class LoadWeightsRequest:
    """The body of the ``load_weights`` endpoint (§3.13). ``optimizer`` restores Adam state too.

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
    """The body of the ``save_weights_for_sampler`` endpoint (§3.14).

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
class _OfFuture:
    """A body about one future, named by its request id."""

    request_id: str


@attrs.frozen(kw_only=True)
class _OfModel:
    """A body about one model, named by its id."""

    model_id: str


class CancelFutureRequest(_OfFuture):
    """The body of the ``cancel_future`` endpoint: drop a request that has not run."""


@attrs.frozen(kw_only=True)
class RetrieveFutureRequest(_OfFuture):
    """The body of the ``retrieve_future`` endpoint (§4.2)."""

    allow_metadata_only: bool = False


@attrs.frozen(kw_only=True)
class SessionHeartbeatRequest:
    """The body of the ``session_heartbeat`` endpoint."""

    session_id: str


class GetInfoRequest(_OfModel):
    """The body of the ``get_info`` endpoint."""


class UnloadModelRequest(_OfModel):
    """The body of the ``unload_model`` endpoint."""


@attrs.frozen(kw_only=True)
class CreateSamplingSessionRequest:
    """The body of the ``create_sampling_session`` endpoint (tinker sampling)."""

    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


@attrs.frozen(kw_only=True)
class CreateCustomLossRequest:
    """The body of the ``create_custom_loss`` endpoint (tinker's uploaded losses).

    ``name``, ``inputs`` and ``graph`` stay the plain JSON the client sent: the trainer
    checks them as a whole (`firetitan.local.loss_graphs.check_graph`).
    """

    session_id: str
    custom_loss_seq_id: int
    name: Any
    inputs: Any
    graph: Any


@attrs.frozen(kw_only=True)
class SampleRequest:
    """The body of the ``asample`` endpoint (tinker sampling).

    ``target_prompt_logprobs`` keeps the layout it was sent in (dense, or CSR whose
    unlisted cells request nothing), so that its result can answer in the same layout.
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
    | CancelFutureRequest
    | SessionHeartbeatRequest
    | GetInfoRequest
    | UnloadModelRequest
    | CreateSamplingSessionRequest
    | CreateCustomLossRequest
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
    names = ("model_id", "path", "seq_id", "ttl_seconds", "user_metadata", "overwrite")
    return _present(r, *names, type="save_weights")


def _encode_load_weights(r: LoadWeightsRequest) -> JSON:
    if r.model_id is not None:
        return {
            "model_id": r.model_id,
            "path": r.path,
            "optimizer": r.optimizer,
            "seq_id": r.seq_id,
            "type": "load_weights",
        }
    names = ("session_id", "model_seq_id", "base_model", "user_metadata", "path", "optimizer")
    return _present(r, *names, type="load_weights")


def _encode_save_for_sampler(r: SaveWeightsForSamplerRequest) -> JSON:
    names = ("model_id", "path", "sampling_session_seq_id", "seq_id", "ttl_seconds")
    export = _present(r, "checkpoint_type", "export_precision", "metadata")
    return _present(r, *names, type="save_weights_for_sampler", **export)


def _encode_cancel_future(r: CancelFutureRequest) -> JSON:
    return {"request_id": r.request_id}


def _encode_session_heartbeat(r: SessionHeartbeatRequest) -> JSON:
    return {"session_id": r.session_id, "type": "session_heartbeat"}


def _encode_get_info(r: GetInfoRequest) -> JSON:
    return {"model_id": r.model_id, "type": "get_info"}


def _encode_unload_model(r: UnloadModelRequest) -> JSON:
    return {"model_id": r.model_id, "type": "unload_model"}


def _encode_retrieve_future(r: RetrieveFutureRequest) -> JSON:
    return {"request_id": r.request_id, "allow_metadata_only": r.allow_metadata_only}


def _encode_create_sampling_session(r: CreateSamplingSessionRequest) -> JSON:
    names = ("session_id", "sampling_session_seq_id", "base_model", "model_path")
    return _present(r, *names, type="create_sampling_session")


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
    CancelFutureRequest: _encode_cancel_future,
    SessionHeartbeatRequest: _encode_session_heartbeat,
    GetInfoRequest: _encode_get_info,
    UnloadModelRequest: _encode_unload_model,
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
