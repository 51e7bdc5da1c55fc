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

A step is all or nothing: a refused step leaves weights, moments, the step counter,
the gradients and the window exactly as they were (`AdamW.apply`). So is the
accumulation of one ``forward_backward`` (`AdamW.accumulating`).

The update is written out with ``torch._foreach_*`` kernels: elementwise, hence
bit-reproducible, and one kernel launch per list rather than per tensor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import attrs
import tinker
import torch

from firetitan.local.engine import UserError, optim_metrics

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
        # What `apply` computes the new weights and moments into before it commits them;
        # the replaced moments become the next step's. Kept, because allocating fresh
        # tensors every step costs several times the arithmetic on a CPU.
        self._spare: tuple[list[torch.Tensor], ...] | None = None

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

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Accumulate the gradients of one request all or nothing.

        The block's backward passes accumulate into fresh buffers; on leaving, they are
        added to what was accumulated before, unless the block raised or the sum is not
        finite, in which case the earlier gradients are put back exactly as they were.

        Raises:
            UserError: This request's gradients (or their sum with the earlier ones) are
                not finite or have no finite norm; nothing was accumulated.
        """
        earlier = self.grads()
        for p in self.params.values():
            p.grad = None
        try:
            yield
            combined = self.grads()
            torch._foreach_add_(combined, earlier)  # IEEE addition commutes: same sums
            # A finite norm also bounds every square, so the step can use them.
            if not math.isfinite(_global_norm(combined)):
                raise UserError(
                    "the gradients of this request are too large to use (not finite, or "
                    "their norm overflows float32): are loss_fn_inputs 'weights' or "
                    "'advantages' too large? They were discarded; the gradients "
                    "accumulated before are unchanged"
                )
        except BaseException:
            for p, g in zip(self.params.values(), earlier, strict=True):
                p.grad = g
            raise

    def apply(
        self, adam: tinker.AdamParams, *, normalization: str, window: Window
    ) -> dict[str, float]:
        """Run steps 1-5 of the module docstring and return the step's metrics.

        All or nothing: the new weights and moments are computed aside and checked
        finite before any of them (or the step counter, gradients and window) changes.
        That keeps four spare tensors per trainable parameter.

        Raises:
            UserError: The updated weights or moments would not be finite. Nothing
                changed.
        """
        grads = self.grads()
        params = [p.detach() for p in self.params.values()]

        divisor = {
            "none": None,
            "num_loss_tokens": window.loss_tokens,
            "num_sequences": window.sequences,
        }[normalization]
        if divisor == 0:
            grads = [torch.zeros_like(g) for g in grads]
        elif divisor is not None:
            grads = list(torch._foreach_div(grads, float(divisor)))

        norm = _global_norm(grads)  # finite: `accumulating` refuses gradients otherwise
        clip = adam.grad_clip_norm
        if clip > 0 and norm > clip:
            grads = list(torch._foreach_mul(grads, clip / norm))

        step = self.step + 1
        lr, beta1, beta2 = adam.learning_rate, adam.beta1, adam.beta2
        bias1 = 1.0 - beta1**step
        bias2 = 1.0 - beta2**step
        decay, step_size = 1.0 - lr * adam.weight_decay, lr / bias1
        largest = min(torch.finfo(p.dtype).max for p in params) if params else math.inf
        if max(abs(decay), step_size) > largest:  # torch refuses such scalars outright
            raise _non_finite_update(adam)
        # Into spare tensors, so the model's own stay untouched (x * 1.0 is exactly x).
        old_avg, old_sq = list(self.exp_avg.values()), list(self.exp_avg_sq.values())
        if self._spare is None:
            self._spare = tuple(
                [torch.empty_like(t) for t in ts] for ts in (params, old_avg, old_sq, old_sq)
            )
        new_params, exp_avg, exp_avg_sq, denom = self._spare
        torch._foreach_copy_(new_params, params)
        torch._foreach_mul_(new_params, decay)
        torch._foreach_copy_(exp_avg, old_avg)
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_copy_(exp_avg_sq, old_sq)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
        torch._foreach_copy_(denom, exp_avg_sq)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, adam.eps)
        torch._foreach_addcdiv_(new_params, exp_avg, denom, -step_size)
        if not all(map(_all_finite, (new_params, exp_avg, exp_avg_sq))):
            raise _non_finite_update(adam)

        # Commit: nothing above touched the model's state.
        torch._foreach_copy_(params, new_params)
        self.exp_avg = dict(zip(self.exp_avg, exp_avg, strict=True))
        self.exp_avg_sq = dict(zip(self.exp_avg_sq, exp_avg_sq, strict=True))
        self._spare = (new_params, old_avg, old_sq, denom)
        self.step = step
        self.zero_grad()
        metrics = optim_metrics(
            step=self.step,
            learning_rate=lr,
            loss_tokens=window.loss_tokens,
            sequences=window.sequences,
            grad_norm=norm,
        )
        window.reset()
        return metrics


def _non_finite_update(adam: tinker.AdamParams) -> UserError:
    return UserError(
        f"this update would make the weights non-finite (learning_rate="
        f"{adam.learning_rate!r}, eps={adam.eps!r} too large or small?); it was not "
        "applied: weights, optimizer moments, step count and gradients are unchanged"
    )


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    # Min and max show any inf and propagate NaN: two small reductions per tensor
    # instead of a boolean copy of each (several times faster on CPU).
    ends = [end for t in tensors if t.numel() for end in torch.aminmax(t)]
    return not ends or bool(torch.isfinite(torch.stack(ends)).all())


def _global_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors, 2)
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2).item())
