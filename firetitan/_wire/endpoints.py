"""The one endpoint table: every HTTP endpoint of the trainer protocol, named once.

The client core calls endpoints through this table (``endpoints.FORWARD.path``) and the
local trainer builds its routes from the trainer's rows (`TRAINER`), with one handler
per `Endpoint.name`; ``tests/test_endpoints.py`` fails when a trainer endpoint has no
handler or, for those the client calls, no client call. The rows served by an
inference deployment (`Endpoint.server` ``"deployment"``, spec/deployment.md) are the
hot-load, completions and account endpoints the deployment client calls.

Adding an RPC: a row here, its request class and decoder (``requests.py``,
``request_decoders.py``), a client method, a server handler.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs

from firetitan._wire.request_decoders import DECODERS, RequestDecoder

__all__ = [
    "ALL",
    "API_PREFIX",
    "ASAMPLE",
    "BY_NAME",
    "CANCEL_FUTURE",
    "CLIENT_CONFIG",
    "COMPLETIONS",
    "COPY_WEIGHTS",
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


@attrs.frozen(kw_only=True)
class Endpoint:
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
    """

    name: str
    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str
    ordered: bool = False
    future: bool = False
    request_type: str = ""
    client: bool = True
    server: Literal["trainer", "deployment"] = "trainer"

    @property
    def decode(self) -> RequestDecoder | None:
        """The request body decoder (`firetitan._wire.decode_request`), if it has one."""
        return DECODERS.get(self.name)


def _post(name: str, path: str | None = None, **kw: Any) -> Endpoint:
    return Endpoint(name=name, method="POST", path=f"{API_PREFIX}/{path or name}", **kw)


def _get(name: str, path: str | None = None, **kw: Any) -> Endpoint:
    return Endpoint(name=name, method="GET", path=f"{API_PREFIX}/{path or name}", **kw)


def _rest(method: Literal["GET", "POST", "PUT", "DELETE"], name: str, path: str) -> Endpoint:
    return Endpoint(name=name, method=method, path=f"{API_PREFIX}/{path}")


def _ordered(name: str, request_type: str) -> Endpoint:
    return _post(name, ordered=True, future=True, request_type=request_type)


# Sessions and server facts (wire.md §3.1-§3.6).
CLIENT_CONFIG: Final = _post("client_config", "client/config")
DYNAMIC_CONFIG: Final = _post("dynamic_config", "client/dynamic_config", client=False)
CREATE_SESSION: Final = _post("create_session")
SESSION_HEARTBEAT: Final = _post("session_heartbeat")
FINISH_SESSION: Final = _post("finish_session", "sessions/{session_id}/finish", client=False)
TELEMETRY: Final = _post("telemetry", client=False)
HEALTHZ: Final = _get("healthz", client=False)
GET_SERVER_CAPABILITIES: Final = _get("get_server_capabilities")
# Models and training (§3.7-§3.17).
CREATE_MODEL: Final = _post("create_model", future=True, request_type="CreateModel")
GET_INFO: Final = _post("get_info")
FORWARD: Final = _ordered("forward", "Forward")
FORWARD_BACKWARD: Final = _ordered("forward_backward", "ForwardBackward")
OPTIM_STEP: Final = _ordered("optim_step", "OptimStep")
SAVE_WEIGHTS: Final = _ordered("save_weights", "SaveWeights")
LOAD_WEIGHTS: Final = _ordered("load_weights", "LoadWeights")
SAVE_WEIGHTS_FOR_SAMPLER: Final = _ordered("save_weights_for_sampler", "SaveWeightsForSampler")
SAVE_WEIGHTS_EXTERNAL: Final = _post(
    "save_weights_external",
    ordered=True,
    future=True,
    request_type="SaveWeightsExternal",
    client=False,
)
LIST_CHECKPOINTS: Final = _get("list_checkpoints")
UNLOAD_MODEL: Final = _post("unload_model", future=True, request_type="Unload model")
# Futures (§4).
RETRIEVE_FUTURE: Final = _post("retrieve_future")
CANCEL_FUTURE: Final = _post("cancel_future")
# Sampling (tinker's sampling sessions).
CREATE_SAMPLING_SESSION: Final = _post("create_sampling_session")
ASAMPLE: Final = _post("asample", future=True, request_type="Sample")
GET_SAMPLER: Final = _get("get_sampler", "samplers/{sampling_session_id}")
RETRIEVE_FUTURES: Final = _post("retrieve_futures", client=False)
JOIN_SAMPLING_SESSION: Final = _post("join_sampling_session", client=False)
# tinker's REST view (training runs, checkpoints, sessions), for its RestClient and ours.
_CHECKPOINT = "training_runs/{run_id}/checkpoints/{segment}/{name}"
LIST_TRAINING_RUNS: Final = _rest("GET", "list_training_runs", "training_runs")
GET_TRAINING_RUN: Final = _rest("GET", "get_training_run", "training_runs/{run_id}")
LIST_RUN_CHECKPOINTS: Final = _rest(
    "GET", "list_run_checkpoints", "training_runs/{run_id}/checkpoints"
)
DELETE_CHECKPOINT: Final = _rest("DELETE", "delete_checkpoint", _CHECKPOINT)
SET_CHECKPOINT_TTL: Final = _rest("PUT", "set_checkpoint_ttl", f"{_CHECKPOINT}/ttl")
PUBLISH_CHECKPOINT: Final = _rest("POST", "publish_checkpoint", f"{_CHECKPOINT}/publish")
UNPUBLISH_CHECKPOINT: Final = _rest("DELETE", "unpublish_checkpoint", f"{_CHECKPOINT}/publish")
LIST_USER_CHECKPOINTS: Final = _rest("GET", "list_user_checkpoints", "checkpoints")
WEIGHTS_INFO: Final = _rest("POST", "weights_info", "weights_info")
COPY_WEIGHTS: Final = _rest("POST", "copy_weights", "copy_weights")
LIST_SESSIONS: Final = _rest("GET", "list_sessions", "sessions")
GET_SESSION: Final = _rest("GET", "get_session", "sessions/{session_id}")
EXTERNAL_WEIGHTS_URLS: Final = attrs.evolve(
    _rest("GET", "external_weights_urls", f"{_CHECKPOINT}/external_weights_urls"), client=False
)
#: Signed download URLs of external weights: the one route served without the API key.
EXTERNAL_FILE: Final = attrs.evolve(
    _rest("GET", "external_file", "external_files/{name}/{file}"), client=False
)
# The local trainer's own (served only with ``debug_endpoints``).
DEBUG_EXECUTION_LOG: Final = _get("debug_execution_log", "debug/execution_log", client=False)

# An inference deployment's (spec/deployment.md): hot-loading snapshots, completions,
# and the control plane's account lookup.
HOT_LOAD: Final = Endpoint(
    name="hot_load", method="POST", path="/hot_load/v1/models/hot_load", server="deployment"
)
HOT_LOAD_STATUS: Final = Endpoint(
    name="hot_load_status", method="GET", path="/hot_load/v1/models/hot_load", server="deployment"
)
COMPLETIONS: Final = Endpoint(
    name="completions", method="POST", path="/inference/v1/completions", server="deployment"
)
LIST_ACCOUNTS: Final = Endpoint(
    name="list_accounts", method="GET", path="/v1/accounts", server="deployment"
)

ALL: Final[tuple[Endpoint, ...]] = tuple(
    value for value in list(globals().values()) if isinstance(value, Endpoint)
)
#: The endpoints the trainer serves (the local trainer's routes).
TRAINER: Final[tuple[Endpoint, ...]] = tuple(e for e in ALL if e.server == "trainer")
BY_NAME: Final[dict[str, Endpoint]] = {endpoint.name: endpoint for endpoint in ALL}
