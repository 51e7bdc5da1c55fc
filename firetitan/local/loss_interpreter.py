"""Runs a checked custom loss (`firetitan.local.loss_graphs.LossGraph`) on one datum.

Every target the graph may name is resolved here once, at import, from the allowlists of
`loss_graphs` (``FUNCTIONS``, ``METHODS``): the interpreter looks up a node's target in
these tables and nowhere else, so a name the client sent never reaches an import,
``getattr`` or ``eval``. What a node computes at run time is guarded too: operators run
on numbers and tensors only, a Python integer that outgrows 64 bits and a tensor of
more than `MAX_ELEMENTS` values stop the loss, and any error a target raises becomes a
`UserError` that names the datum, the node and its target.

Both engines run losses through `run`: the torch engine on the model's log-probabilities
(gradients flow through the graph), the null engine on its deterministic ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import torch
import torch.nn.functional

from firetitan.local import loss_graphs
from firetitan.local.loss_graphs import Dtype, LossGraph, Node, Ref
from firetitan.local.rules import UserError

__all__ = ["MAX_ELEMENTS", "run"]

#: The most values any intermediate tensor of a custom loss may hold.
MAX_ELEMENTS: Final = 1 << 24
#: Python integers (sizes, counts) stay within this many bits.
_MAX_INT_BITS: Final = 64

_MODULES: Final[Mapping[str, Any]] = {
    "operator": operator,
    "torch": torch,
    "torch._C._nn": torch._C._nn,
    "torch.nn.functional": torch.nn.functional,
}


def _resolve(name: str) -> Callable[..., Any]:
    if name == "getattr":  # its attribute is checked against loss_graphs.ATTRIBUTES
        return getattr
    module, _, attr = name.rpartition(".")
    function: Callable[..., Any] = getattr(_MODULES[module], attr)
    return function


_FUNCTIONS: Final = {name: _resolve(name) for name in sorted(loss_graphs.FUNCTIONS)}
_METHODS: Final = {name: getattr(torch.Tensor, name) for name in sorted(loss_graphs.METHODS)}
_DTYPES: Final = {name: getattr(torch, name) for name in sorted(loss_graphs.DTYPES)}


def run(
    graph: LossGraph, values: Sequence[torch.Tensor], index: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss and metrics of datum ``index``.

    Args:
        graph: The checked loss.
        values: Its inputs, in `LossGraph.inputs` order (``logprobs`` first).
        index: The datum's index in the request, for messages.

    Returns:
        The scalar loss tensor (differentiable where ``logprobs`` is) and each metric
        as a float.

    Raises:
        UserError: A node failed or broke a run-time guard, or the loss is not a scalar
            tensor, or a metric not a single number.
    """
    env: dict[str, Any] = dict(zip(graph.placeholders, values, strict=True))
    where = f"datum {index}: custom loss {graph.name!r}"
    for node in graph.nodes:
        env[node.name] = _call(where, node, env)
    loss = env[graph.loss.name]
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserError(f"{where}: the loss must be a scalar tensor, got {shape}")
    metrics: dict[str, float] = {}
    for key, ref in graph.metrics:
        value = env[ref.name]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = float(value.detach().reshape(()).item())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            metrics[key] = float(value)
        else:
            raise UserError(f"{where}: metric {key!r} must be a single number")
    return loss, metrics


def _call(where: str, node: Node, env: Mapping[str, Any]) -> Any:
    at = f"{where}: node {node.name!r} ({node.target})"
    args = [_value(arg, env) for arg in node.args]
    kwargs = {key: _value(arg, env) for key, arg in node.kwargs}
    if node.numeric_only:
        for arg in args:
            if not isinstance(arg, torch.Tensor | int | float):
                kind = type(arg).__name__
                raise UserError(f"{at}: operates on numbers and tensors, got a {kind}")
        if node.target == "operator.pow" and not any(isinstance(a, torch.Tensor) for a in args):
            exponent = args[1] if len(args) == 2 else 0
            if isinstance(exponent, int) and abs(exponent) > _MAX_INT_BITS:
                raise UserError(f"{at}: an integer power above {_MAX_INT_BITS}")
    if node.op == "call_method":
        if not isinstance(args[0], torch.Tensor):
            raise UserError(f"{at}: calls a tensor method on a {type(args[0]).__name__}")
        function = _METHODS[node.target]
    else:
        function = _FUNCTIONS[node.target]
    try:
        result = function(*args, **kwargs)
    except Exception as exc:  # whatever the client's graph does wrong is its mistake
        raise UserError(f"{at} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(result, torch.Tensor) and result.numel() > MAX_ELEMENTS:
        raise UserError(
            f"{at}: makes a tensor of {result.numel()} values; the limit is {MAX_ELEMENTS}"
        )
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        raise UserError(f"{at}: makes an integer beyond {_MAX_INT_BITS} bits")
    return result


def _value(arg: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(arg, Ref):
        return env[arg.name]
    if isinstance(arg, Dtype):
        return _DTYPES[arg.name]
    if isinstance(arg, list):
        return [_value(item, env) for item in arg]
    if isinstance(arg, tuple):
        return tuple(_value(item, env) for item in arg)
    if isinstance(arg, dict):
        return {key: _value(item, env) for key, item in arg.items()}
    if isinstance(arg, slice):
        return slice(_value(arg.start, env), _value(arg.stop, env), _value(arg.step, env))
    return arg
