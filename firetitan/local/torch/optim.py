"""AdamW with per-step hyperparameters, gradient-accumulation normalization and clipping.

``optim_step`` (losses.md), in this order:

1. normalization: divide the accumulated gradient by the window's loss-token count
   (``num_loss_tokens``) or by its count of datums with a loss token
   (``num_sequences``); ``none``/absent leaves the raw sum. A count of zero sets the
   gradient to zero;
2. the global L2 norm of the gradient, reported as ``grad_norm:global``;
3. clipping: when ``grad_clip_norm > 0`` and the norm exceeds it, scale the gradient
   by ``grad_clip_norm / norm``;
4. the AdamW update (decoupled weight decay, bias-corrected moments), with the
   ``tinker.AdamParams`` of this very step: learning rate, betas, eps and weight decay
   may change from step to step;
5. zero the gradient.

The update is written out with ``torch._foreach_*`` kernels: elementwise, hence
bit-reproducible, and one kernel launch per list rather than per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs
import tinker
import torch

from firetitan.local.engine import optim_metrics

__all__ = ["AdamW", "Window"]


@attrs.define
class Window:
    """Loss-token counters of the gradient-accumulation window since the last step."""

    loss_tokens: int = 0
    sequences: int = 0

    def reset(self) -> None:
        self.loss_tokens = 0
        self.sequences = 0


class AdamW:
    """AdamW state for an ordered set of parameters.

    Attributes:
        params: Name -> parameter, in a fixed order (the order of every list below).
        exp_avg: First moments, float32, same shapes.
        exp_avg_sq: Second moments.
        step: Number of updates applied so far.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.params = dict(params)
        self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.exp_avg_sq = {
            n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()
        }
        self.step = 0

    def grads(self) -> list[torch.Tensor]:
        """The gradient buffers, allocating zeros for parameters that have none yet."""
        out = []
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        return out

    def zero_grad(self) -> None:
        torch._foreach_zero_(self.grads())

    def apply(
        self, adam: tinker.AdamParams, *, normalization: str, window: Window
    ) -> dict[str, float]:
        """Run steps 1-5 of the module docstring and return the step's metrics."""
        grads = self.grads()
        params = [p.detach() for p in self.params.values()]
        exp_avg = list(self.exp_avg.values())
        exp_avg_sq = list(self.exp_avg_sq.values())

        divisor = {
            "none": None,
            "num_loss_tokens": window.loss_tokens,
            "num_sequences": window.sequences,
        }[normalization]
        if divisor == 0:
            torch._foreach_zero_(grads)
        elif divisor is not None:
            torch._foreach_div_(grads, float(divisor))

        norm = _global_norm(grads)
        clip = adam.grad_clip_norm
        if clip > 0 and norm > clip:
            torch._foreach_mul_(grads, clip / norm)

        self.step += 1
        lr, beta1, beta2 = adam.learning_rate, adam.beta1, adam.beta2
        if adam.weight_decay != 0:
            torch._foreach_mul_(params, 1.0 - lr * adam.weight_decay)
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
        bias1 = 1.0 - beta1**self.step
        bias2 = 1.0 - beta2**self.step
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, adam.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -lr / bias1)

        torch._foreach_zero_(grads)
        metrics = optim_metrics(
            step=self.step,
            learning_rate=lr,
            loss_tokens=window.loss_tokens,
            sequences=window.sequences,
            grad_norm=norm,
        )
        window.reset()
        return metrics


def _global_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors, 2)
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2).item())
