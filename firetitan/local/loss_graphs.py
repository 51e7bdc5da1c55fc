"""Uploaded custom losses: tinker's traced loss graph as plain data, checked before use.

tinker 0.38's ``ServiceClient.create_custom_loss`` traces a per-datum loss with
``torch.fx`` and, when the trainer's client configuration says
``custom_loss_server_side``, uploads it as plain data (``create_custom_loss``): its
inputs (``logprobs`` first, then the ``loss_fn_inputs`` keys it reads, each with a
rank) and its nodes in execution order, each an ``op``, a ``name``, a ``target`` and
encoded ``args`` / ``kwargs``. ``forward_backward`` then names the stored loss with
``loss_fn="custom"`` and ``loss_fn_config={"loss_id": ...}``.

Nothing the client sends is ever executed as code: nothing is unpickled or evaluated,
and no name the client sends is imported or looked up. A graph is accepted only if every
node calls a target of the allowlists below (`FUNCTIONS`, `METHODS`, `ATTRIBUTES`);
the torch engine's interpreter (`firetitan.local.torch.loss_graph`) maps exactly these
names to functions it resolved itself at import time. `check_graph` validates the whole
graph at upload (unknown op or target, references to nodes not yet computed, the
placeholders against the declared inputs, the output's shape and metric names, size
limits) and raises a `UserError` naming the node and its target. It imports no torch,
so the null engine and the server share it.

Uploaded losses belong to the session that created them (`Session.custom_losses`), a
session holds at most `MAX_LOSSES_PER_SESSION`, and they end with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from firetitan.local.user_error import UserError

__all__ = [
    "ATTRIBUTES",
    "DTYPES",
    "FUNCTIONS",
    "LOSS_FN",
    "MAX_LOSSES_PER_SESSION",
    "MAX_NODES",
    "METHODS",
    "Dtype",
    "LossGraph",
    "LossInput",
    "Node",
    "Ref",
    "check_graph",
    "loss_id_of",
    "no_gradient",
    "reduce_metrics",
]

#: The ``loss_fn`` of a ``forward_backward`` that runs an uploaded loss.
LOSS_FN: Final = "custom"

# fmt: off
#: Functions a custom loss may call (``call_function`` targets, as tinker names them).
FUNCTIONS: Final = frozenset(
    {
        # Python operators (torch.fx records arithmetic, comparisons and indexing so).
        *(
            f"operator.{name}"
            for name in (
                "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
                "abs", "matmul", "lt", "le", "gt", "ge", "eq", "ne", "and_", "or_",
                "xor", "invert", "getitem",
            )
        ),
        # Elementwise and reductions; nothing that allocates by a size it is given.
        *(
            f"torch.{name}"
            for name in (
                "abs", "add", "sub", "mul", "div", "neg", "pow", "square", "sqrt",
                "rsqrt", "exp", "expm1", "log", "log1p", "log2", "sigmoid", "tanh",
                "relu", "sign", "clamp", "clip", "minimum", "maximum", "min", "max",
                "where", "sum", "mean", "prod", "cumsum", "logsumexp", "softmax",
                "log_softmax", "detach", "isfinite", "isnan", "nan_to_num", "zeros_like",
                "ones_like", "full_like", "stack", "cat", "gather", "squeeze",
                "unsqueeze", "reshape", "flatten", "transpose", "logical_and",
                "logical_or", "logical_not", "lt", "le", "gt", "ge", "eq", "ne",
                "any", "all", "std", "var", "amax", "amin", "argmax", "argmin",
                "masked_fill", "exp2", "floor", "ceil", "round", "trunc", "frac",
                "reciprocal", "lerp", "dot", "outer", "diff",
            )
        ),
        # torch.nn.functional as torch.fx names it (the C ones by their C module).
        "torch._C._nn.log_sigmoid",
        "torch._C._nn.softplus",
        "torch.nn.functional.log_softmax",
        "torch.nn.functional.softmax",
        "torch.nn.functional.logsigmoid",
        "torch.nn.functional.softplus",
        "torch.nn.functional.relu",
        "torch.nn.functional.silu",
        # Attribute reads (``x.shape``), limited to `ATTRIBUTES`.
        "getattr",
    }
)

#: Tensor methods a custom loss may call (``call_method`` targets): no in-place
#: method, nothing that leaves torch (``item``, ``tolist``), moves devices, or grows
#: a tensor by a size it is given (``repeat``, ``expand``).
METHODS: Final = frozenset(
    {
        "abs", "add", "sub", "mul", "div", "neg", "pow", "square", "sqrt", "rsqrt",
        "exp", "expm1", "log", "log1p", "log2", "sigmoid", "tanh", "relu", "sign",
        "clamp", "clip", "clamp_min", "clamp_max", "minimum", "maximum", "min", "max",
        "where", "sum", "mean", "prod", "cumsum", "logsumexp", "softmax", "log_softmax",
        "detach", "isfinite", "isnan", "nan_to_num", "gather", "squeeze", "unsqueeze",
        "reshape", "view", "flatten", "transpose", "t", "masked_fill", "float",
        "double", "half", "bfloat16", "long", "int", "bool", "to", "type_as", "size",
        "dim", "numel", "any", "all", "std", "var", "amax", "amin", "argmax", "argmin",
        "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not",
        "floor", "ceil", "round", "trunc", "reciprocal", "lerp", "dot", "diff",
        "contiguous", "clone",
    }
)

# fmt: on

#: Attributes ``getattr`` may read from a tensor.
ATTRIBUTES: Final = frozenset({"shape", "ndim", "dtype"})

#: dtypes an argument may name (``x.to(torch.float64)``).
DTYPES: Final = frozenset({"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool"})

#: The most nodes a graph may have, placeholders and output included.
MAX_NODES: Final = 1024
#: The most custom losses one session may upload.
MAX_LOSSES_PER_SESSION: Final = 64
#: The deepest nesting of an argument (lists, tuples, dicts, slices).
MAX_ARG_DEPTH: Final = 8
#: The most values one argument may hold, nested ones included.
MAX_ARG_ITEMS: Final = 256
#: The most inputs a loss takes, ``logprobs`` included (tinker's own limit).
MAX_INPUTS: Final = 16

_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_LOSS_NAME = re.compile(r"[A-Za-z0-9_.<>-]{1,128}")
_NODE_KEYS = frozenset({"op", "name", "target", "args", "kwargs"})
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
# Operators that compute on numbers and tensors only (never on strings or lists,
# whose repetition by a number could exhaust memory).
_NUMERIC_OPERATORS = frozenset(f for f in FUNCTIONS if f.startswith("operator.")) - {
    "operator.getitem"
}


@attrs.frozen
class Ref:
    """A reference to an earlier node's value."""

    name: str


@attrs.frozen
class Dtype:
    """A torch dtype, by its name in `DTYPES`."""

    name: str


@attrs.frozen(kw_only=True)
class Node:
    """One checked computation: ``op`` is ``call_function`` or ``call_method``.

    ``args`` and ``kwargs`` hold Python values, `Ref`, `Dtype`, tuples, lists, dicts,
    slices and ``Ellipsis``.
    """

    op: str
    name: str
    target: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]

    @property
    def numeric_only(self) -> bool:
        """Its target computes on numbers and tensors only (`_NUMERIC_OPERATORS`)."""
        return self.target in _NUMERIC_OPERATORS


@attrs.frozen(kw_only=True)
class LossInput:
    """One input of the loss: ``logprobs`` or a ``loss_fn_inputs`` key, and its rank
    (0 a scalar, 1 ``[T]``, 2 ``[T, K]``)."""

    name: str
    rank: int


@attrs.frozen(kw_only=True)
class LossGraph:
    """A checked custom loss, ready for an engine's interpreter.

    Attributes:
        loss_id: The id ``forward_backward`` names it by.
        session_id: The session that uploaded it; only that session's models use it.
        name: The loss function's name (for messages).
        inputs: ``logprobs`` first, then the ``loss_fn_inputs`` keys, in call order.
        placeholders: The names of the nodes that stand for `inputs`, in that order.
        nodes: The computations, in execution order.
        loss: The value returned as the loss (a scalar tensor at run time).
        metrics: ``(key, value)`` pairs, keys ``custom/<name>:sum|mean``.
    """

    loss_id: str
    session_id: str
    name: str
    inputs: tuple[LossInput, ...]
    placeholders: tuple[str, ...]
    nodes: tuple[Node, ...]
    loss: Ref
    metrics: tuple[tuple[str, Ref], ...]

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The ``loss_fn_inputs`` keys the loss reads (every input after ``logprobs``)."""
        return tuple(item.name for item in self.inputs[1:])


def loss_id_of(session_id: str, custom_loss_seq_id: int) -> str:
    """The id of a session's ``custom_loss_seq_id``-th upload (a retry gets the same)."""
    return f"{session_id}:loss:{custom_loss_seq_id}"


def no_gradient(graph: LossGraph) -> UserError:
    """The error for training on a loss that does not depend on the logprobs."""
    return UserError(
        f"custom loss {graph.name!r} does not depend on logprobs, so it has no gradient to train on"
    )


def reduce_metrics(per_datum: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """A request's custom metrics from each datum's: ``:sum`` keys add up, ``:mean``
    keys average over the request's datums (as tinker reduces them client-side)."""
    sums: dict[str, float] = {}
    for metrics in per_datum:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    return {
        key: value / len(per_datum) if key.endswith(":mean") else value
        for key, value in sums.items()
    }


def check_graph(*, loss_id: str, session_id: str, name: Any, inputs: Any, graph: Any) -> LossGraph:
    """Check an uploaded loss (the untrusted ``create_custom_loss`` body's fields).

    Raises:
        UserError: The name, an input or the graph breaks a rule; the message names
            the node and its target where there is one.
    """
    if not isinstance(name, str) or not _LOSS_NAME.fullmatch(name):
        raise UserError(f"name must be 1 to 128 letters, digits or '_.<>-', got {_short(name)}")
    where = f"custom loss {name!r}"
    checked_inputs = _check_inputs(where, inputs)
    if not isinstance(graph, Mapping):
        raise UserError(f"{where}: graph must be an object with 'format' and 'nodes'")
    unknown = sorted(set(graph) - {"format", "nodes"})
    if unknown:
        raise UserError(f"{where}: graph has unknown field(s) {unknown}")
    if graph.get("format", 1) != 1:
        raise UserError(f"{where}: graph format {_short(graph.get('format'))} is not 1")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise UserError(f"{where}: graph.nodes must be a non-empty list")
    if len(nodes) > MAX_NODES:
        raise UserError(f"{where}: graph has {len(nodes)} nodes; the limit is {MAX_NODES}")
    return _GraphChecker(where, checked_inputs).check(
        nodes, loss_id=loss_id, session_id=session_id, name=name
    )


def _check_inputs(where: str, inputs: Any) -> tuple[LossInput, ...]:
    if not isinstance(inputs, list) or not inputs:
        raise UserError(f"{where}: inputs must be a non-empty list, logprobs first")
    if len(inputs) > MAX_INPUTS:
        raise UserError(f"{where}: {len(inputs)} inputs; a loss takes at most {MAX_INPUTS}")
    checked: list[LossInput] = []
    for i, item in enumerate(inputs):
        if not isinstance(item, Mapping) or set(item) != {"name", "rank"}:
            raise UserError(f"{where}: inputs[{i}] must be an object with name and rank")
        input_name, rank = item["name"], item["rank"]
        if not isinstance(input_name, str) or not _INPUT_NAME.fullmatch(input_name):
            raise UserError(
                f"{where}: inputs[{i}].name must be a lowercase name of letters, digits and "
                f"underscores, got {_short(input_name)}"
            )
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise UserError(f"{where}: inputs[{i}].rank must be 0, 1 or 2, got {_short(rank)}")
        checked.append(LossInput(name=input_name, rank=rank))
    if checked[0].name != "logprobs" or checked[0].rank not in (1, 2):
        raise UserError(f"{where}: inputs[0] must be logprobs, of rank 1 ([T]) or 2 ([T, K])")
    names = [item.name for item in checked]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{where}: input(s) {repeated} are declared more than once")
    return tuple(checked)


class _GraphChecker:
    """Walks the nodes once, in order, keeping the names computed so far."""

    def __init__(self, where: str, inputs: tuple[LossInput, ...]) -> None:
        self.where = where
        self.inputs = inputs
        self.defined: set[str] = set()

    def check(self, nodes: list[Any], *, loss_id: str, session_id: str, name: str) -> LossGraph:
        placeholders: list[str] = []  # the inputs they stand for (their targets), in order
        placeholder_names: list[str] = []
        computed: list[Node] = []
        output: tuple[Ref, tuple[tuple[str, Ref], ...]] | None = None
        for index, raw in enumerate(nodes):
            op, node_name, target = self._header(index, raw)
            at = f"{self.where}: node {node_name!r} ({op} {target!r})"
            if output is not None:
                raise UserError(f"{at} follows the output node; the output must be last")
            if op == "placeholder":
                if computed:
                    raise UserError(f"{at}: placeholders must come before every computation")
                placeholders.append(self._placeholder(at, raw, target))
                placeholder_names.append(node_name)
            elif op in ("call_function", "call_method"):
                computed.append(self._call(at, raw, op, node_name, target))
            elif op == "output":
                output = self._output(at, raw)
            else:
                raise UserError(self._refused_op(at, op))
            self.defined.add(node_name)
        declared = [item.name for item in self.inputs]
        if placeholders != declared:
            raise UserError(
                f"{self.where}: the graph's placeholders {placeholders} must be its declared "
                f"inputs {declared}, in order"
            )
        if output is None:
            raise UserError(f"{self.where}: the graph has no output node")
        loss, metrics = output
        return LossGraph(
            loss_id=loss_id,
            session_id=session_id,
            name=name,
            inputs=self.inputs,
            placeholders=tuple(placeholder_names),
            nodes=tuple(computed),
            loss=loss,
            metrics=metrics,
        )

    def _header(self, index: int, raw: Any) -> tuple[str, str, str]:
        if not isinstance(raw, Mapping):
            raise UserError(f"{self.where}: graph.nodes[{index}] must be an object")
        unknown = sorted(set(raw) - _NODE_KEYS)
        missing = sorted({"op", "name", "target"} - set(raw))
        if unknown or missing:
            raise UserError(
                f"{self.where}: graph.nodes[{index}] has unknown field(s) {unknown} or lacks "
                f"{missing}; a node has op, name, target, args and kwargs"
            )
        op, node_name, target = raw["op"], raw["name"], raw["target"]
        if not isinstance(node_name, str) or not _NODE_NAME.fullmatch(node_name):
            raise UserError(
                f"{self.where}: graph.nodes[{index}].name must be an identifier of at most "
                f"128 characters, got {_short(node_name)}"
            )
        if node_name in self.defined:
            raise UserError(f"{self.where}: node name {node_name!r} is used twice")
        if not isinstance(op, str) or not isinstance(target, str) or len(target) > 256:
            raise UserError(
                f"{self.where}: node {node_name!r}: op and target must be strings, got "
                f"{_short(op)} and {_short(target)}"
            )
        return op, node_name, target

    @staticmethod
    def _refused_op(at: str, op: str) -> str:
        if op == "call_module":
            return f"{at}: calls a module; custom losses may call functions only"
        if op == "get_attr":
            return (
                f"{at}: reads a captured tensor; a custom loss may read only logprobs and "
                "the loss_fn_inputs it names"
            )
        return f"{at}: unknown op; a node is placeholder, call_function, call_method or output"

    def _placeholder(self, at: str, raw: Mapping[str, Any], target: str) -> str:
        # torch.fx may rename a placeholder's node (a parameter named ``sum`` becomes
        # ``sum_1``); its target is the parameter, the input it stands for.
        if raw.get("args") or raw.get("kwargs"):
            raise UserError(f"{at}: a placeholder takes no arguments")
        declared = [item.name for item in self.inputs]
        if target not in declared:
            raise UserError(f"{at}: is not among the loss's declared inputs {declared}")
        return target

    def _call(self, at: str, raw: Mapping[str, Any], op: str, name: str, target: str) -> Node:
        allowed = FUNCTIONS if op == "call_function" else METHODS
        if target not in allowed:
            what = "function" if op == "call_function" else "tensor method"
            raise UserError(
                f"{at}: {target!r} is not a {what} custom losses may call (the allowed ones "
                f"are listed in firetitan/local/loss_graphs.py, "
                f"{'FUNCTIONS' if op == 'call_function' else 'METHODS'})"
            )
        budget = [MAX_ARG_ITEMS]
        args = self._arg(at, raw.get("args", []), 0, budget)
        kwargs = self._arg(at, {"dict": raw.get("kwargs", {})}, 0, budget)
        if not isinstance(args, list):
            raise UserError(f"{at}: args must be a list")
        if op == "call_method" and not (args and isinstance(args[0], Ref)):
            raise UserError(f"{at}: a method call's first argument must be a node")
        if target == "getattr" and (
            len(args) != 2 or not isinstance(args[0], Ref) or args[1] not in ATTRIBUTES
        ):
            raise UserError(f"{at}: getattr may read only {sorted(ATTRIBUTES)} of a node")
        # The attribute getattr reads is the one string a node may pass.
        plain = args[:1] if target == "getattr" else args
        strings = [a for a in _leaves([*plain, *kwargs.values()]) if isinstance(a, str)]
        if strings:
            raise UserError(
                f"{at}: passes the string {_short(strings[0])}; custom losses pass numbers, "
                "tensors and dtypes only"
            )
        return Node(op=op, name=name, target=target, args=tuple(args), kwargs=tuple(kwargs.items()))

    def _output(self, at: str, raw: Mapping[str, Any]) -> tuple[Ref, tuple[tuple[str, Ref], ...]]:
        args = self._arg(at, raw.get("args", []), 0, [MAX_ARG_ITEMS])
        one = isinstance(args, list) and len(args) == 1 and not raw.get("kwargs")
        value = args[0] if one else None
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise UserError(f"{at}: the loss must return (loss, metrics)")
        loss, metrics = value
        if not isinstance(loss, Ref):
            raise UserError(f"{at}: the loss must be a node, got {_short(loss)}")
        if not isinstance(metrics, dict):
            raise UserError(f"{at}: the metrics must be a dict")
        checked: list[tuple[str, Ref]] = []
        for key, metric in metrics.items():
            if not _METRIC_KEY.fullmatch(key):
                raise UserError(
                    f"{at}: metric {_short(key)} must be named custom/<name>:sum or "
                    "custom/<name>:mean in lowercase"
                )
            if not isinstance(metric, Ref):
                raise UserError(f"{at}: metric {key!r} must be a node, got {_short(metric)}")
            checked.append((key, metric))
        return loss, tuple(checked)

    def _arg(self, at: str, raw: Any, depth: int, budget: list[int]) -> Any:
        """An encoded argument as a Python value (tinker's ``CustomLossNode.args``)."""
        budget[0] -= 1
        if budget[0] < 0:
            raise UserError(f"{at}: its arguments hold more than {MAX_ARG_ITEMS} values")
        if depth > MAX_ARG_DEPTH:
            raise UserError(f"{at}: its arguments nest deeper than {MAX_ARG_DEPTH}")
        if raw is None or isinstance(raw, bool | int | str):
            if isinstance(raw, str) and len(raw) > 64:
                raise UserError(f"{at}: passes a string of {len(raw)} characters")
            return raw
        if isinstance(raw, float):
            return raw
        if isinstance(raw, list):
            return [self._arg(at, item, depth + 1, budget) for item in raw]
        if not isinstance(raw, Mapping) or len(raw) != 1:
            raise UserError(f"{at}: cannot read the argument {_short(raw)}")
        ((kind, value),) = raw.items()
        if kind == "ref":
            if not isinstance(value, str) or value not in self.defined:
                raise UserError(
                    f"{at}: refers to {_short(value)}, which is not a node computed before it"
                )
            return Ref(value)
        if kind == "tuple" and isinstance(value, list):
            return tuple(self._arg(at, item, depth + 1, budget) for item in value)
        if kind == "dict" and isinstance(value, Mapping):
            return {
                self._key(at, key): self._arg(at, item, depth + 1, budget)
                for key, item in value.items()
            }
        if kind == "slice" and isinstance(value, list) and len(value) == 3:
            parts = [self._arg(at, item, depth + 1, budget) for item in value]
            if not all(p is None or isinstance(p, int | Ref) for p in parts):
                raise UserError(f"{at}: a slice holds integers, nodes or null")
            return slice(*parts)
        if kind == "ellipsis" and value is True:
            return Ellipsis
        if kind == "float" and value in _FLOATS:
            return _FLOATS[value]
        if kind == "dtype" and value in DTYPES:
            return Dtype(value)
        if kind in ("device", "layout", "memory_format"):
            raise UserError(
                f"{at}: passes a {kind}; a custom loss runs where the trainer runs it, "
                "so pass no device, layout or memory format"
            )
        raise UserError(f"{at}: cannot read the argument {_short(raw)}")

    @staticmethod
    def _key(at: str, key: Any) -> str:
        if not isinstance(key, str) or len(key) > 128:
            raise UserError(f"{at}: a keyword or dict key must be a short string")
        return key


def _leaves(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if isinstance(value, list | tuple):
            out.extend(_leaves(value))
        elif isinstance(value, dict):
            out.extend(_leaves(list(value.values())))
        else:
            out.append(value)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
