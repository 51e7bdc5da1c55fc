"""The built-in losses of ``spec/losses.md``, over a padded `Batch`.

Every loss is a plain sum over positions and datums; nothing is averaged. Notation:
``lp_t`` the learner's float32 log-probability of the target, ``q_t`` the sampler's
(``logprobs`` input), ``A_t`` the advantage, ``w_t`` the optional weight.

* ``cross_entropy``: ``L = -Σ_t Σ_k w_tk · lp_tk`` (``w`` = 1 when absent; any sign).
* ``importance_sampling``: ``L = -Σ_t c_t · r_t · A_t`` with ``r_t = exp(lp_t - q_t)``.
* ``ppo``: ``L = -Σ_t c_t · min(r_t·A_t, clip(r_t, lo, hi)·A_t)``.
* ``cispo``: ``L = -Σ_t c_t · sg(clip(r_t, lo, hi)) · lp_t · A_t``.
* ``dro``: ``L = -Σ_t c_t · [lp_t·A_t - ½·β·(lp_t - q_t)²]``.
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

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from firetitan.local.engine import UserError
from firetitan.local.torch.inputs import Batch

__all__ = ["LossConfig", "parse_loss_config", "per_datum_loss", "target_logprobs"]


@attrs.frozen(kw_only=True)
class LossConfig:
    """``loss_fn_config`` values with the defaults of losses.md."""

    clip_low: float = 0.8
    clip_high: float = 1.2
    beta: float = 0.05
    kl_coeff: float = 0.0


def parse_loss_config(loss_fn: str, config: Mapping[str, Any] | None) -> LossConfig:
    """Read the keys ``loss_fn`` uses; other keys pass through unread.

    Raises:
        UserError: A key has a non-numeric or non-finite value, the clip bounds are
            out of order, or ``target_logprob_support`` asks for anything but the
            full vocabulary.
    """
    cfg = dict(config or {})
    support = cfg.get("target_logprob_support", "full_vocabulary")
    if support != "full_vocabulary":
        raise UserError(
            f"loss_fn_config['target_logprob_support'] = {support!r} is not supported; "
            "this trainer computes log-probabilities over the full vocabulary"
        )
    defaults = LossConfig()
    lo = _number(cfg, "clip_low_threshold", defaults.clip_low)
    hi = _number(cfg, "clip_high_threshold", defaults.clip_high)
    beta = _number(cfg, "beta", defaults.beta)
    kl_coeff = _number(cfg, "kl_coeff", defaults.kl_coeff)
    if loss_fn in ("ppo", "cispo") and not 0 <= lo <= hi:
        raise UserError(
            f"loss_fn_config clip bounds must satisfy 0 <= clip_low_threshold <= "
            f"clip_high_threshold, got {lo} and {hi}"
        )
    return LossConfig(clip_low=lo, clip_high=hi, beta=beta, kl_coeff=kl_coeff)


def _number(cfg: Mapping[str, Any], key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
    return float(value)


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
        loss_fn: A key of `firetitan.local.torch.inputs.LOSS_INPUTS`.
        lp: (B, T, K) float32 target log-probabilities.
        batch: The padded batch the log-probabilities came from.
        config: Parsed ``loss_fn_config``.
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
        clipped = torch.clamp(ratio, config.clip_low, config.clip_high)
        term = torch.minimum(ratio * adv, clipped * adv)
    elif loss_fn == "cispo":
        clipped = torch.clamp(ratio, config.clip_low, config.clip_high).detach()
        term = clipped * lp1 * adv
    elif loss_fn == "dro":
        term = lp1 * adv - 0.5 * config.beta * (lp1 - q) ** 2
    elif loss_fn == "stable_reinforce":
        weight = torch.clamp(ratio, max=config.clip_high).detach()
        term = weight * lp1 * adv - 0.5 * config.kl_coeff * (lp1 - q) ** 2
    else:  # parse_datums rejects unknown losses before we get here
        raise AssertionError(loss_fn)
    weighted = torch.where(active, batch.rl_coef * term, torch.zeros_like(term))
    return -weighted.sum(dim=1)
