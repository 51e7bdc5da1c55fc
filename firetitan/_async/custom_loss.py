"""The math of ``forward_backward_custom`` (spec/losses.md), kept apart from the I/O.

The trainer only knows built-in losses. To train on an arbitrary differentiable
function ``C(logprobs)`` the client:

1. runs ``forward`` with ``cross_entropy`` on data that carries only
   ``target_tokens`` and ``weights`` (`forward_data`);
2. evaluates ``C`` with torch on float32 logprob tensors that require gradients, and
   collects ``g = dC/dlogprobs`` (`run_user_loss`);
3. runs ``forward_backward`` with ``cross_entropy`` and ``weights = -g``
   (`linearized_data`). The trainer's loss is ``L = -sum(w * logprobs)``, so its
   parameter gradient is ``sum(g * dlogprobs/dtheta) = dC/dtheta`` exactly, as long as
   the parameters did not change between the two passes. The training client
   guarantees that by ordering the backward directly behind the forward.

torch is imported lazily: only this feature needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import tinker

if TYPE_CHECKING:
    import torch

__all__ = [
    "CustomLossFn",
    "UserLossResult",
    "check_precomputed",
    "check_targets",
    "forward_data",
    "linearized_data",
    "merge_result",
    "run_user_loss",
]

#: ``loss_fn(data, logprobs_list) -> (loss, metrics)``: ``loss`` a scalar torch tensor.
CustomLossFn = Callable[[list[tinker.Datum], list["torch.Tensor"]], tuple[Any, Mapping[str, Any]]]


@attrs.frozen
class UserLossResult:
    """What the user's loss produced.

    Attributes:
        loss: The loss value.
        metrics: The user's metrics, as floats.
        grads: ``dC/dlogprobs`` per datum (float32, shaped like ``target_tokens``).
    """

    loss: float
    metrics: dict[str, float]
    grads: list[np.ndarray]


def _targets(datum: tinker.Datum, index: int) -> tinker.TensorData:
    targets = datum.loss_fn_inputs.get("target_tokens")
    if targets is None:
        raise ValueError(
            f"data[{index}].loss_fn_inputs has no 'target_tokens'; "
            "forward_backward_custom needs them"
        )
    return targets


def _target_shape(datum: tinker.Datum, index: int) -> tuple[int, ...]:
    return tuple(_targets(datum, index).to_numpy().shape)


def check_targets(data: Sequence[tinker.Datum]) -> None:
    """Check that every datum has ``target_tokens``.

    Raises:
        ValueError: A datum has none (the message names its index).
    """
    for i, datum in enumerate(data):
        _targets(datum, i)


def forward_data(data: Sequence[tinker.Datum]) -> list[tinker.Datum]:
    """Build the forward batch: ``target_tokens`` and ``weights`` only.

    A datum without ``weights`` gets float32 zeros shaped like its targets. Other
    inputs stay local: the user's loss receives the original datums.

    Raises:
        ValueError: A datum has no ``target_tokens`` (the message names its index).
    """
    out = []
    for i, datum in enumerate(data):
        targets = _targets(datum, i)
        weights = datum.loss_fn_inputs.get("weights")
        if weights is None:
            zeros = np.zeros(_target_shape(datum, i), dtype=np.float32)
            weights = tinker.TensorData.from_numpy(zeros)
        out.append(
            tinker.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={"target_tokens": targets, "weights": weights},
            )
        )
    return out


def check_precomputed(output: tinker.ForwardBackwardOutput, data: Sequence[tinker.Datum]) -> None:
    """Check that an earlier forward's output fits ``data``.

    Raises:
        ValueError: Not one output per datum, an output without ``logprobs``, or a
            logprob count that differs from the datum's target count.
    """
    if len(output.loss_fn_outputs) != len(data):
        raise ValueError(
            f"precomputed_forward has {len(output.loss_fn_outputs)} outputs "
            f"but data has {len(data)} datums"
        )
    for i, (out, datum) in enumerate(zip(output.loss_fn_outputs, data, strict=True)):
        logprobs = out.get("logprobs")
        if logprobs is None:
            raise ValueError(f"precomputed_forward.loss_fn_outputs[{i}] has no 'logprobs'")
        want = int(np.prod(_target_shape(datum, i)))
        got = logprobs.to_numpy().size
        if got != want:
            raise ValueError(
                f"precomputed_forward.loss_fn_outputs[{i}].logprobs has {got} values "
                f"but data[{i}] has {want} target tokens"
            )


def _logprob_tensors(
    output: tinker.ForwardBackwardOutput, data: Sequence[tinker.Datum]
) -> list[torch.Tensor]:
    import torch

    tensors = []
    for i, (out, datum) in enumerate(zip(output.loss_fn_outputs, data, strict=True)):
        logprobs = out.get("logprobs")
        if logprobs is None:
            raise ValueError(f"the forward output for data[{i}] has no 'logprobs'")
        shape = _target_shape(datum, i)
        array = np.asarray(logprobs.to_numpy(), dtype=np.float32)
        if array.size != int(np.prod(shape)):
            raise ValueError(
                f"the forward output for data[{i}] has {array.size} logprobs "
                f"for {int(np.prod(shape))} target tokens"
            )
        tensor = torch.from_numpy(array.reshape(shape).copy())
        tensors.append(tensor.requires_grad_(True))
    return tensors


def run_user_loss(
    loss_fn: CustomLossFn,
    data: Sequence[tinker.Datum],
    output: tinker.ForwardBackwardOutput,
) -> UserLossResult:
    """Evaluate the user's loss on the forward's logprobs and differentiate it.

    Runs synchronously (callers put it in a worker thread).

    Args:
        loss_fn: ``loss_fn(data, logprobs_list) -> (loss, metrics)``.
        data: The caller's original datums.
        output: The forward pass's output (one ``logprobs`` tensor per datum).

    Returns:
        The loss value, the metrics and the gradients.

    Raises:
        ValueError: The loss is not a scalar tensor that depends on the logprobs, or
            some datum's logprobs got no gradient.
        Exception: Whatever ``loss_fn`` raises, unchanged.
    """
    import torch

    logprobs = _logprob_tensors(output, data)
    returned: object = loss_fn(list(data), logprobs)
    if not isinstance(returned, tuple) or len(returned) != 2:
        raise ValueError("the custom loss must return a (loss, metrics) tuple")
    loss, metrics = returned
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("the custom loss must return a scalar torch tensor as its loss")
    if not loss.requires_grad:
        raise ValueError("the custom loss does not depend on the logprobs (no gradient)")
    loss.backward()  # type: ignore[no-untyped-call]
    grads = []
    for i, tensor in enumerate(logprobs):
        if tensor.grad is None:
            raise ValueError(
                f"the logprobs of data[{i}] got no gradient: the custom loss must use "
                "every datum's logprobs"
            )
        grads.append(tensor.grad.detach().to(torch.float32).numpy())
    user_metrics = {str(key): float(value) for key, value in dict(metrics or {}).items()}
    return UserLossResult(loss=float(loss.detach()), metrics=user_metrics, grads=grads)


def linearized_data(
    data: Sequence[tinker.Datum], grads: Sequence[np.ndarray]
) -> list[tinker.Datum]:
    """Build the backward batch: the same targets with ``weights = -grad``."""
    out = []
    for i, (datum, grad) in enumerate(zip(data, grads, strict=True)):
        weights = np.negative(grad, dtype=np.float32)
        out.append(
            tinker.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={
                    "target_tokens": _targets(datum, i),
                    "weights": tinker.TensorData.from_numpy(weights),
                },
            )
        )
    return out


def merge_result(
    backward: tinker.ForwardBackwardOutput, result: UserLossResult
) -> tinker.ForwardBackwardOutput:
    """The custom call's result: the backward's output plus the user's metrics.

    ``loss:sum`` stays the trainer's surrogate value; the user's loss is added as
    ``loss`` unless the user's metrics already name it.
    """
    metrics = dict(backward.metrics)
    metrics.update(result.metrics)
    metrics.setdefault("loss", result.loss)
    return dataclasses.replace(backward, metrics=metrics)
