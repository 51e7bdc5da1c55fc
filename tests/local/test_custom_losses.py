"""Uploaded custom losses over the wire (null engine): tinker's ``create_custom_loss``
body is checked as a whole at upload, hostile graphs are refused naming the node and
its target, a ``forward_backward`` with ``loss_fn="custom"`` computes what tinker's own
client-side run of the graph computes on the same logprobs, and losses stay with the
session that created them."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import torch
from tinker import types
from tinker.lib.public_interfaces.custom_loss import (
    LossHandle,
    encode_graph,
    run_loss_handle,
    trace_loss,
)

from firetitan._wire import decode_datum
from firetitan.local.loss_graphs import MAX_LOSSES_PER_SESSION, MAX_NODES

from .conftest import TrainerFactory
from .helpers import Api, forward_body, text_datum
from .test_tinker_server import tinker_session

TOKENS = [5, 6, 7, 8]
RANKS: dict[str, types.CustomLossInputRank] = {"logprobs": 1, "sampler": 1, "advantages": 1}


def clipped_is(logprobs: Any, sampler: Any, advantages: Any) -> Any:
    ratio = torch.exp(logprobs - sampler)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    n = logprobs.shape[0]  # a shape read: builtins.getattr on the wire
    tokens = (advantages != 0).sum() + 0 * n
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/tokens:sum": tokens}


HANDLE = trace_loss(clipped_is, RANKS, "session")


def upload_body(
    session_id: str, seq: int = 0, handle: LossHandle = HANDLE, **override: Any
) -> dict[str, Any]:
    """``create_custom_loss`` as tinker sends it, with ``override`` fields."""
    body = {
        "session_id": session_id,
        "custom_loss_seq_id": seq,
        "name": handle.name,
        "inputs": [i.model_dump() for i in handle.inputs],
        "graph": encode_graph(handle).model_dump(mode="json"),
        "type": "create_custom_loss",
    }
    return {**body, **override}


def rl_datum() -> dict[str, Any]:
    datum = text_datum(TOKENS)
    n = len(TOKENS)
    datum["loss_fn_inputs"]["sampler"] = {"data": [-1.5] * n, "dtype": "float32", "shape": [n]}
    datum["loss_fn_inputs"]["advantages"] = {
        "data": [1.0, -0.5, 0.0, 2.0],
        "dtype": "float32",
        "shape": [n],
    }
    return datum


async def upload(api: Api, session_id: str, **body: Any) -> dict[str, Any]:
    request_id = await api.submit("create_custom_loss", upload_body(session_id, **body))
    return await api.outcome(request_id)


def custom_fb(model: str, seq_id: int, loss_id: str) -> dict[str, Any]:
    body = forward_body(model, seq_id, [rl_datum(), rl_datum()], backward=True, loss_fn="custom")
    body["forward_backward_input"]["loss_fn_config"] = {"loss_id": loss_id}
    return body


@pytest_asyncio.fixture
async def api_session(make_trainer: TrainerFactory) -> AsyncIterator[tuple[Api, str]]:
    """A raw client of a null-engine trainer, and a tinker session on it."""
    async with make_trainer() as (_trainer, api):
        yield api, await tinker_session(api)


@pytest.mark.asyncio
async def test_an_uploaded_loss_computes_what_the_client_side_run_computes(
    api_session: tuple[Api, str],
) -> None:
    api, session = api_session
    answer = await upload(api, session)
    assert answer["type"] == "create_custom_loss"
    loss_id = answer["loss_id"]
    model = await api.model(session)
    out = await api.result(await api.submit("forward_backward", custom_fb(model, 1, loss_id)))
    # tinker's own client-side run of the same handle, on the logprobs the trainer used.
    logprobs = [
        torch.tensor(o["logprobs"]["data"], dtype=torch.float32) for o in out["loss_fn_outputs"]
    ]
    datum = decode_datum(rl_datum())
    loss, metrics = run_loss_handle(HANDLE, [datum, datum], logprobs)
    assert out["metrics"]["loss:sum"] == pytest.approx(float(loss), rel=1e-6)
    for key, value in metrics.items():
        assert out["metrics"][key] == pytest.approx(value, rel=1e-6)
    assert out["metrics"]["custom/tokens:sum"] == 6.0


def shadowing(logprobs: Any, sum: Any) -> Any:  # torch.fx renames the placeholder sum_1
    return -(logprobs * sum).sum(), {}


@pytest.mark.asyncio
async def test_an_input_whose_placeholder_torch_fx_renamed(api_session: tuple[Api, str]) -> None:
    api, session = api_session
    handle = trace_loss(shadowing, {"logprobs": 1, "sum": 1}, "s")
    assert [n.name for n in encode_graph(handle).nodes][:2] == ["logprobs", "sum_1"]
    loss_id = (await upload(api, session, handle=handle))["loss_id"]
    model = await api.model(session)
    datum = text_datum(TOKENS)
    datum["loss_fn_inputs"]["sum"] = {"data": [0.5] * 4, "dtype": "float32", "shape": [4]}
    body = forward_body(model, 1, [datum], backward=True, loss_fn="custom")
    body["forward_backward_input"]["loss_fn_config"] = {"loss_id": loss_id}
    out = await api.result(await api.submit("forward_backward", body))
    logprobs = out["loss_fn_outputs"][0]["logprobs"]["data"]
    assert out["metrics"]["loss:sum"] == pytest.approx(-0.5 * sum(logprobs), rel=1e-6)


def _graph_with(edit: Any) -> dict[str, Any]:
    graph = encode_graph(HANDLE).model_dump(mode="json")
    edit(graph["nodes"])
    return graph


def _retarget(target: str, op: str = "call_function") -> Any:
    def edit(nodes: list[dict[str, Any]]) -> None:
        exp = next(n for n in nodes if n["name"] == "exp")
        exp["op"], exp["target"] = op, target

    return edit


def _huge(nodes: list[dict[str, Any]]) -> None:
    last = nodes.pop()
    for i in range(MAX_NODES):
        nodes.append(
            {
                "op": "call_function",
                "name": f"x{i}",
                "target": "operator.neg",
                "args": [{"ref": "logprobs"}],
                "kwargs": {},
            }
        )
    nodes.append(last)


def _forward_ref(nodes: list[dict[str, Any]]) -> None:
    sub = next(n for n in nodes if n["name"] == "sub")
    sub["args"][0] = {"ref": "exp"}


def _string_arg(nodes: list[dict[str, Any]]) -> None:
    sub = next(n for n in nodes if n["name"] == "sub")
    sub["args"][1] = "rm -rf /"


HOSTILE_GRAPHS: dict[str, tuple[Any, str]] = {
    "builtins.eval": (
        _retarget("builtins.eval"),
        "node 'exp' (call_function 'builtins.eval'): 'builtins.eval' is not a function "
        "custom losses may call",
    ),
    "os.system": (
        _retarget("os.system"),
        "node 'exp' (call_function 'os.system'): 'os.system' is not a function",
    ),
    "a method that leaves torch": (
        _retarget("tolist", "call_method"),
        "node 'exp' (call_method 'tolist'): 'tolist' is not a tensor method",
    ),
    "call_module": (
        _retarget("linear", "call_module"),
        "node 'exp' (call_module 'linear'): calls a module",
    ),
    "get_attr": (
        _retarget("weight", "get_attr"),
        "node 'exp' (get_attr 'weight'): reads a captured tensor",
    ),
    "a huge graph": (
        _huge,
        f"graph has {len(encode_graph(HANDLE).nodes) + MAX_NODES} nodes; the limit is {MAX_NODES}",
    ),
    "a reference to a later node": (
        _forward_ref,
        "node 'sub' (call_function 'operator.sub'): refers to 'exp', which is not a node "
        "computed before it",
    ),
    "a string argument": (
        _string_arg,
        "node 'sub' (call_function 'operator.sub'): passes the string 'rm -rf /'",
    ),
}


@pytest.mark.asyncio
async def test_hostile_graphs_are_refused_at_upload(api_session: tuple[Api, str]) -> None:
    api, session = api_session
    for seq, (case, (edit, message)) in enumerate(HOSTILE_GRAPHS.items()):
        answer = await upload(api, session, seq=seq, graph=_graph_with(edit))
        assert answer["category"] == "user", case
        assert f"custom loss 'clipped_is': {message}" in answer["error"], case


@pytest.mark.asyncio
async def test_inputs_must_match_the_placeholders(api_session: tuple[Api, str]) -> None:
    api, session = api_session
    inputs = [
        {"name": "logprobs", "rank": 1},
        {"name": "sampler", "rank": 1},
        {"name": "rewards", "rank": 1},
    ]
    answer = await upload(api, session, inputs=inputs)
    assert answer["category"] == "user"
    assert (
        "node 'advantages' (placeholder 'advantages'): is not among the loss's declared "
        "inputs ['logprobs', 'sampler', 'rewards']" in answer["error"]
    )


@pytest.mark.asyncio
async def test_a_loss_serves_only_its_own_session(api_session: tuple[Api, str]) -> None:
    api, owner = api_session
    other = await tinker_session(api)
    loss_id = (await upload(api, owner))["loss_id"]
    model = await api.model(other)
    refused = await api.outcome(await api.submit("forward_backward", custom_fb(model, 1, loss_id)))
    unknown = await api.outcome(await api.submit("forward_backward", custom_fb(model, 2, "x")))
    # The model's queue goes on after the refused requests.
    mine = (await upload(api, other))["loss_id"]
    accepted = await api.result(await api.submit("forward_backward", custom_fb(model, 3, mine)))
    assert refused["category"] == "user"
    assert f"custom loss {loss_id!r} belongs to another session" in refused["error"]
    assert "unknown custom loss 'x'" in unknown["error"]
    assert "custom/ratio:mean" in accepted["metrics"]


@pytest.mark.asyncio
async def test_a_retried_upload_is_one_loss_and_a_session_holds_a_bounded_number(
    api_session: tuple[Api, str],
) -> None:
    api, session = api_session
    first = await api.submit("create_custom_loss", upload_body(session, 0))
    assert await api.submit("create_custom_loss", upload_body(session, 0)) == first
    for seq in range(1, MAX_LOSSES_PER_SESSION):
        await api.result(await api.submit("create_custom_loss", upload_body(session, seq)))
    over = await upload(api, session, seq=MAX_LOSSES_PER_SESSION)
    assert over["category"] == "user"
    assert f"already holds {MAX_LOSSES_PER_SESSION} custom losses" in over["error"]


@pytest.mark.asyncio
async def test_malformed_bodies_are_refused_and_unknown_sessions_not_found(
    api_session: tuple[Api, str],
) -> None:
    api, session = api_session
    body = copy.deepcopy(upload_body(session))
    del body["graph"]
    status, answer = await api.post("create_custom_loss", body)
    assert status == 400 and "graph" in answer["detail"]
    status, answer = await api.post("create_custom_loss", upload_body("sess-none"))
    assert status == 404 and "sess-none" in answer["detail"]
