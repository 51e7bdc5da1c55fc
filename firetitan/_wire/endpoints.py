"""The one endpoint table: every HTTP endpoint of the trainer protocol, named once.

The client core calls endpoints through this table (``endpoints.FORWARD.path``) and the
local trainer builds its routes from the trainer's rows (`TRAINER`), with one handler
per `Endpoint.name`; ``tests/test_endpoints.py`` fails when a trainer endpoint has no
handler or, for those the client calls, no client call. The rows served by an
inference deployment (`Endpoint.server` ``"deployment"``, spec/deployment.md) are the
hot-load, completions and account endpoints the deployment client calls.

Each row also names its result codec (`Endpoint.result`): the client decodes every
answer, or every polled result of a future, through it, never per call site.

Adding an RPC: a row here (with its result codec), its request class and decoder
(``requests.py``, ``request_decoders.py``), a client method, a server handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Generic, Literal, TypeVar

import attrs
import pydantic
from tinker import types as ttypes

from firetitan._wire.answers import (
    decode_account_names,
    decode_checkpoint_names,
    decode_created_model,
    decode_forward_result,
)
from firetitan._wire.hotload import decode_hot_load_status
from firetitan._wire.outcomes import decode_future_outcome
from firetitan._wire.request_decoders import DECODERS, RequestDecoder
from firetitan._wire.results import decode_sample_response

__all__ = [
    "ALL",
    "API_PREFIX",
    "ASAMPLE",
    "BY_NAME",
    "CANCEL_FUTURE",
    "CLIENT_CONFIG",
    "COMPLETIONS",
    "COPY_WEIGHTS",
    "CREATE_CUSTOM_LOSS",
    "CREATE_MODEL",
    "CREATE_SAMPLING_SESSION",
    "CREATE_SESSION",
    "DEBUG_EXECUTION_LOG",
    "DELETE_CHECKPOINT",
    "DYNAMIC_CONFIG",
    "EXTERNAL_FILE",
    "EXTERNAL_WEIGHTS_URLS",
    "FINISH_SESSION",
    "FORWARD",
    "FORWARD_BACKWARD",
    "GET_INFO",
    "GET_SAMPLER",
    "GET_SERVER_CAPABILITIES",
    "GET_SESSION",
    "GET_TRAINING_RUN",
    "HEALTHZ",
    "HOT_LOAD",
    "HOT_LOAD_STATUS",
    "JOIN_SAMPLING_SESSION",
    "LIST_ACCOUNTS",
    "LIST_CHECKPOINTS",
    "LIST_RUN_CHECKPOINTS",
    "LIST_SESSIONS",
    "LIST_TRAINING_RUNS",
    "LIST_USER_CHECKPOINTS",
    "LOAD_WEIGHTS",
    "OPTIM_STEP",
    "PUBLISH_CHECKPOINT",
    "RETRIEVE_FUTURE",
    "RETRIEVE_FUTURES",
    "SAVE_WEIGHTS",
    "SAVE_WEIGHTS_EXTERNAL",
    "SAVE_WEIGHTS_FOR_SAMPLER",
    "SESSION_HEARTBEAT",
    "SET_CHECKPOINT_TTL",
    "TELEMETRY",
    "TRAINER",
    "UNLOAD_MODEL",
    "UNPUBLISH_CHECKPOINT",
    "WEIGHTS_INFO",
    "Endpoint",
]

API_PREFIX: Final = "/api/v1"

R = TypeVar("R")
M = TypeVar("M", bound=pydantic.BaseModel)


def _as_is(answer: Any) -> Any:
    """The result codec of answers read as they are (acknowledgements, empty answers)."""
    return answer


def _model(model: type[M]) -> Callable[[Any], M]:
    """The result codec of an answer that is one of tinker's response types (its
    validation error is a ValueError, as a `WireError` is)."""
    return model.model_validate


@attrs.frozen(kw_only=True)
class Endpoint(Generic[R]):
    """One endpoint of the protocol.

    Attributes:
        name: Its name: the key of its server handler and of its request decoder.
        method: ``"GET"``, ``"POST"``, ``"PUT"`` or ``"DELETE"``.
        path: The URL path; ``{field}`` segments are path parameters.
        ordered: It carries a ``seq_id`` and runs in the model's call order.
        future: It is answered with a ``request_id`` to poll with ``retrieve_future``.
        request_type: What a poll for its result sends as ``X-Tinker-Request-Type``
            (futures only).
        client: The firetitan client calls it (the others serve tinker, operators or
            tests).
        server: Who serves it: the ``"trainer"`` or an inference ``"deployment"``.
        result: Its result codec: the parsed answer (for a future, its polled result)
            to the value the client returns; raises ValueError on an answer that does
            not fit.
    """

    name: str
    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str
    ordered: bool = False
    future: bool = False
    request_type: str = ""
    client: bool = True
    server: Literal["trainer", "deployment"] = "trainer"
    result: Callable[[Any], R]

    @property
    def decode(self) -> RequestDecoder | None:
        """The request body decoder (`firetitan._wire.decode_request`), if it has one."""
        return DECODERS.get(self.name)


def _post(
    name: str, path: str | None = None, *, result: Callable[[Any], R], **kw: Any
) -> Endpoint[R]:
    return Endpoint(
        name=name, method="POST", path=f"{API_PREFIX}/{path or name}", result=result, **kw
    )


def _get(
    name: str, path: str | None = None, *, result: Callable[[Any], R], **kw: Any
) -> Endpoint[R]:
    return Endpoint(
        name=name, method="GET", path=f"{API_PREFIX}/{path or name}", result=result, **kw
    )


def _rest(
    method: Literal["GET", "POST", "PUT", "DELETE"],
    name: str,
    path: str,
    result: Callable[[Any], R],
) -> Endpoint[R]:
    return Endpoint(name=name, method=method, path=f"{API_PREFIX}/{path}", result=result)


def _deployment(
    method: Literal["GET", "POST"], name: str, path: str, result: Callable[[Any], R]
) -> Endpoint[R]:
    return Endpoint(name=name, method=method, path=path, server="deployment", result=result)


def _ordered(name: str, request_type: str, result: Callable[[Any], R]) -> Endpoint[R]:
    return _post(name, ordered=True, future=True, request_type=request_type, result=result)


# Sessions and server facts (wire.md §3.1-§3.6).
CLIENT_CONFIG: Final = _post("client_config", "client/config", result=_as_is)
DYNAMIC_CONFIG: Final = _post(
    "dynamic_config", "client/dynamic_config", client=False, result=_as_is
)
CREATE_SESSION: Final = _post("create_session", result=_model(ttypes.CreateSessionResponse))
SESSION_HEARTBEAT: Final = _post("session_heartbeat", result=_as_is)
FINISH_SESSION: Final = _post(
    "finish_session", "sessions/{session_id}/finish", client=False, result=_as_is
)
TELEMETRY: Final = _post("telemetry", client=False, result=_as_is)
HEALTHZ: Final = _get("healthz", client=False, result=_as_is)
GET_SERVER_CAPABILITIES: Final = _get(
    "get_server_capabilities", result=_model(ttypes.GetServerCapabilitiesResponse)
)
# Models and training (§3.7-§3.17).
CREATE_MODEL: Final = _post(
    "create_model", future=True, request_type="CreateModel", result=decode_created_model
)
GET_INFO: Final = _post("get_info", result=_model(ttypes.GetInfoResponse))
FORWARD: Final = _ordered("forward", "Forward", decode_forward_result)
FORWARD_BACKWARD: Final = _ordered("forward_backward", "ForwardBackward", decode_forward_result)
OPTIM_STEP: Final = _ordered("optim_step", "OptimStep", _model(ttypes.OptimStepResponse))
SAVE_WEIGHTS: Final = _ordered("save_weights", "SaveWeights", _model(ttypes.SaveWeightsResponse))
LOAD_WEIGHTS: Final = _ordered("load_weights", "LoadWeights", _model(ttypes.LoadWeightsResponse))
SAVE_WEIGHTS_FOR_SAMPLER: Final = _ordered(
    "save_weights_for_sampler",
    "SaveWeightsForSampler",
    _model(ttypes.SaveWeightsForSamplerResponse),
)
SAVE_WEIGHTS_EXTERNAL: Final = _post(
    "save_weights_external",
    ordered=True,
    future=True,
    request_type="SaveWeightsExternal",
    client=False,
    result=_model(ttypes.SaveWeightsResponse),
)
LIST_CHECKPOINTS: Final = _get("list_checkpoints", result=decode_checkpoint_names)
UNLOAD_MODEL: Final = _post(
    "unload_model",
    future=True,
    request_type="Unload model",
    result=_model(ttypes.UnloadModelResponse),
)
# tinker's uploaded custom losses (firetitan.local.loss_graphs).
CREATE_CUSTOM_LOSS: Final = _post(
    "create_custom_loss",
    future=True,
    request_type="CreateCustomLoss",
    client=False,
    result=_model(ttypes.CreateCustomLossResponse),
)
# Futures (§4).
RETRIEVE_FUTURE: Final = _post("retrieve_future", result=decode_future_outcome)
CANCEL_FUTURE: Final = _post("cancel_future", result=_as_is)
# Sampling (tinker's sampling sessions).
CREATE_SAMPLING_SESSION: Final = _post(
    "create_sampling_session", result=_model(ttypes.CreateSamplingSessionResponse)
)
ASAMPLE: Final = _post("asample", future=True, request_type="Sample", result=decode_sample_response)
GET_SAMPLER: Final = _get(
    "get_sampler", "samplers/{sampling_session_id}", result=_model(ttypes.GetSamplerResponse)
)
RETRIEVE_FUTURES: Final = _post("retrieve_futures", client=False, result=_as_is)
JOIN_SAMPLING_SESSION: Final = _post("join_sampling_session", client=False, result=_as_is)
# tinker's REST view (training runs, checkpoints, sessions), for its RestClient and ours.
_CHECKPOINT = "training_runs/{run_id}/checkpoints/{segment}/{name}"
LIST_TRAINING_RUNS: Final = _rest(
    "GET", "list_training_runs", "training_runs", _model(ttypes.TrainingRunsResponse)
)
GET_TRAINING_RUN: Final = _rest(
    "GET", "get_training_run", "training_runs/{run_id}", _model(ttypes.TrainingRun)
)
LIST_RUN_CHECKPOINTS: Final = _rest(
    "GET",
    "list_run_checkpoints",
    "training_runs/{run_id}/checkpoints",
    _model(ttypes.CheckpointsListResponse),
)
DELETE_CHECKPOINT: Final = _rest("DELETE", "delete_checkpoint", _CHECKPOINT, _as_is)
SET_CHECKPOINT_TTL: Final = _rest("PUT", "set_checkpoint_ttl", f"{_CHECKPOINT}/ttl", _as_is)
PUBLISH_CHECKPOINT: Final = _rest("POST", "publish_checkpoint", f"{_CHECKPOINT}/publish", _as_is)
UNPUBLISH_CHECKPOINT: Final = _rest(
    "DELETE", "unpublish_checkpoint", f"{_CHECKPOINT}/publish", _as_is
)
LIST_USER_CHECKPOINTS: Final = _rest(
    "GET", "list_user_checkpoints", "checkpoints", _model(ttypes.CheckpointsListResponse)
)
WEIGHTS_INFO: Final = _rest(
    "POST", "weights_info", "weights_info", _model(ttypes.WeightsInfoResponse)
)
COPY_WEIGHTS: Final = _rest(
    "POST", "copy_weights", "copy_weights", _model(ttypes.CopyWeightsResponse)
)
LIST_SESSIONS: Final = _rest(
    "GET", "list_sessions", "sessions", _model(ttypes.ListSessionsResponse)
)
GET_SESSION: Final = _rest(
    "GET", "get_session", "sessions/{session_id}", _model(ttypes.GetSessionResponse)
)
EXTERNAL_WEIGHTS_URLS: Final = attrs.evolve(
    _rest("GET", "external_weights_urls", f"{_CHECKPOINT}/external_weights_urls", _as_is),
    client=False,
)
#: Signed download URLs of external weights: the one route served without the API key.
EXTERNAL_FILE: Final = attrs.evolve(
    _rest("GET", "external_file", "external_files/{name}/{file}", _as_is), client=False
)
# The local trainer's own (served only with ``debug_endpoints``).
DEBUG_EXECUTION_LOG: Final = _get(
    "debug_execution_log", "debug/execution_log", client=False, result=_as_is
)

# An inference deployment's (spec/deployment.md): hot-loading snapshots, completions,
# and the control plane's account lookup.
HOT_LOAD: Final = _deployment("POST", "hot_load", "/hot_load/v1/models/hot_load", _as_is)
HOT_LOAD_STATUS: Final = _deployment(
    "GET", "hot_load_status", "/hot_load/v1/models/hot_load", decode_hot_load_status
)
#: Answered as a stream of server-sent events (`firetitan._wire.SSEDecoder`).
COMPLETIONS: Final = _deployment("POST", "completions", "/inference/v1/completions", _as_is)
LIST_ACCOUNTS: Final = _deployment("GET", "list_accounts", "/v1/accounts", decode_account_names)

ALL: Final[tuple[Endpoint[Any], ...]] = tuple(
    value for value in list(globals().values()) if isinstance(value, Endpoint)
)
#: The endpoints the trainer serves (the local trainer's routes).
TRAINER: Final[tuple[Endpoint[Any], ...]] = tuple(e for e in ALL if e.server == "trainer")
BY_NAME: Final[dict[str, Endpoint[Any]]] = {endpoint.name: endpoint for endpoint in ALL}
