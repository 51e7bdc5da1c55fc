"""The built-in losses of ``spec/losses.md``, over a padded `Batch`.

Every loss is a plain sum over positions and datums; nothing is averaged. Notation:
``lp_t`` the learner's float32 log-probability of the target, ``q_t`` the sampler's
(``logprobs`` input), ``A_t`` the advantage, ``w_t`` the optional weight.

* ``cross_entropy``: ``L = -Σ_t Σ_k w_tk · lp_tk`` (``w`` = 1 when absent; any sign).
* ``importance_sampling``: ``L = -Σ_t c_t · r_t · A_t`` with ``r_t = exp(lp_t - q_t)``.
* ``ppo``: ``L = -Σ_t c_t · min(r_t·A_t, clip(r_t, lo, hi)·A_t)``.
* ``cispo``: ``L = -Σ_t c_t · sg(clip(r_t, lo, hi)) · lp_t · A_t``.
* ``dro``: ``L = -Σ_t c_t · [lp_t·A_t - ½·β·(lp_t - q_t)²]``.
* ``gspo`` (the GSPO-token form tinker documents): ``s = exp(mean_{t∈M}(lp_t - q_t))``
  over the positions ``M`` that ``sequence_ratio_mask`` marks; every position's ratio
  ``s_t = sg(s) · exp(lp_t - sg(lp_t))`` has the value of ``s`` and the gradient of its
  own ``lp_t``; ``L = -Σ_t c_t · min(s_t·A_t, clip(s_t, lo, hi)·A_t)``. With one
  advantage per sequence its gradient is that of the sequence-level GSPO objective.
* ``stable_reinforce``: ``L = -Σ_t c_t · [sg(min(r_t, hi))·lp_t·A_t - ½·κ·(lp_t - q_t)²]``,
  REINFORCE with the importance weight truncated from above (``hi`` is
  ``clip_high_threshold``) and an optional quadratic pull κ (``kl_coeff``, default 0)
  towards the sampler. ``q_t`` is the trainer's own record of what the sampler computed
  (`firetitan.local.stability`), never the client's copy.

For RL losses ``c_t = w_t`` (1 when no weights) where ``A_t != 0`` and 0 elsewhere:
losses.md says positions with ``A_t = 0`` contribute no gradient, which the first three
losses satisfy by construction and ``dro`` (whose β term does not vanish) needs the
coefficient for. Masked positions are removed with ``where`` on sanitised inputs rather
than multiplied by zero, so that an extreme ``q_t`` there cannot turn into ``0 · inf``.
"""

from __future__ import annotations

import torch

from firetitan.local.rules import LossConfig
from firetitan.local.torch.inputs import Batch

__all__ = ["per_datum_loss", "target_logprobs"]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the full vocabulary in float32, gathered at ``targets``.

    Args:
        logits: (B, T, V) in any float dtype.
        targets: (B, T, K) int64.

    Returns:
        (B, T, K) float32.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets)


def per_datum_loss(
    loss_fn: str, lp: torch.Tensor, batch: Batch, config: LossConfig
) -> torch.Tensor:
    """The loss of each datum, shape (B,); their sum is the request's loss.

    Args:
        loss_fn: A key of `firetitan.local.rules.LOSSES`.
        lp: (B, T, K) float32 target log-probabilities.
        batch: The padded batch the log-probabilities came from.
        config: The checked ``loss_fn_config``.
    """
    if loss_fn == "cross_entropy":
        return -(batch.ce_weights * lp).sum(dim=(1, 2))

    lp1 = lp[..., 0]
    active = batch.rl_coef != 0
    # Where a position is masked, stand the sampler log-prob in for lp so that the
    # ratio there is exactly 1 and every intermediate is finite.
    q = torch.where(active, batch.sampler_logprobs, lp1.detach())
    adv = batch.advantages
    ratio = torch.exp(lp1 - q)
    if loss_fn == "importance_sampling":
        term = ratio * adv
    elif loss_fn == "ppo":
        term = _clipped_surrogate(lp1 - q, adv, config)
    elif loss_fn == "gspo":
        term = _clipped_surrogate(_gspo_log_ratio(lp1, batch, active), adv, config)
    elif loss_fn == "cispo":
        clipped = torch.clamp(ratio, config.clip_low, config.clip_high).detach()
        term = clipped * lp1 * adv
    elif loss_fn == "dro":
        term = lp1 * adv - 0.5 * config.beta * (lp1 - q) ** 2
    elif loss_fn == "stable_reinforce":
        weight = torch.clamp(ratio, max=config.clip_high).detach()
        term = weight * lp1 * adv - 0.5 * config.kl_coeff * (lp1 - q) ** 2
    else:  # the rules refuse unknown losses before an engine computes
        raise AssertionError(loss_fn)
    weighted = torch.where(active, batch.rl_coef * term, torch.zeros_like(term))
    return -weighted.sum(dim=1)


def _clipped_surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    """``min(r·A, clip(r, lo, hi)·A)`` with ``r = exp(log_ratio)``, the gradient taken
    through the branch the minimum picks.

    The branch is chosen on detached values and only the unclipped one is
    differentiated (the clipped one is constant), with its log-ratio zeroed where it is
    not taken: a ratio that overflows on the clipped side then gives the finite value the
    formula gives and no gradient, rather than ``0 · inf`` in the backward pass.
    """
    r = torch.exp(log_ratio.detach())
    clipped = torch.clamp(r, config.clip_low, config.clip_high) * adv
    unclipped = r * adv <= clipped
    safe = torch.where(unclipped, log_ratio, torch.zeros_like(log_ratio))
    return torch.where(unclipped, torch.exp(safe) * adv, clipped)


def _gspo_log_ratio(lp1: torch.Tensor, batch: Batch, active: torch.Tensor) -> torch.Tensor:
    """``log s_t`` of ``gspo``, shape (B, T): the value of the datum's sequence
    log-ratio, the gradient of the position's own log-probability.

    The sequence log-ratio averages ``lp - q`` over the marked positions only (the rules
    guarantee at least one per datum), from the real sampler log-probs whatever the
    advantage there. Where a position is no loss token its log-ratio is taken as 0: its
    term is dropped anyway.
    """
    in_ratio = batch.ratio_mask
    zeros = torch.zeros_like(lp1)
    diff = torch.where(in_ratio, lp1.detach() - batch.sampler_logprobs, zeros)
    count = in_ratio.sum(dim=1, keepdim=True).clamp(min=1)
    log_s = torch.where(active, diff.sum(dim=1, keepdim=True) / count, zeros)
    return log_s + lp1 - lp1.detach()
