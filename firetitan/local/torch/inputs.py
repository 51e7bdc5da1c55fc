"""Batching checked datums (`rules.DatumArrays`) into one padded batch.

Batching right-pads every datum to the longest one; with a causal model and right
padding, real positions never attend to padding, and padded positions carry zero loss
coefficients (so zero gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch

from firetitan.local.rules import DatumArrays

__all__ = ["Batch", "collate", "split_by_budget"]


@attrs.frozen(eq=False)
class Batch:
    """Datums right-padded to a common length T (and top-K width K).

    Attributes:
        input_ids: (B, T) int64.
        attention_mask: (B, T) int64, 1 on real tokens.
        targets: (B, T, K) int64, 0 on padding.
        ce_weights: (B, T, K) float32: cross_entropy coefficients (weights, ones when
            absent), 0 on padding and unused top-K slots.
        sampler_logprobs: (B, T) float32 (RL losses), 0 on padding.
        advantages: (B, T) float32 (RL losses), 0 on padding.
        rl_coef: (B, T) float32: ``w_t`` (1 when absent) where ``A_t != 0``, else 0.
        ratio_mask: (B, T) bool: the positions ``gspo``'s sequence ratio averages over
            (``sequence_ratio_mask != 0``), False on padding and for other losses.
        datums: The datums, in order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    ce_weights: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    rl_coef: torch.Tensor
    ratio_mask: torch.Tensor
    datums: Sequence[DatumArrays]


def collate(datums: Sequence[DatumArrays], device: torch.device) -> Batch:
    """Pad ``datums`` into one `Batch` on ``device``."""
    b = len(datums)
    t = max(d.length for d in datums)
    k = max(d.width for d in datums)
    input_ids = np.zeros((b, t), dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    targets = np.zeros((b, t, k), dtype=np.int64)
    ce = np.zeros((b, t, k), dtype=np.float32)
    q = np.zeros((b, t), dtype=np.float32)
    adv = np.zeros((b, t), dtype=np.float32)
    coef = np.zeros((b, t), dtype=np.float32)
    in_ratio = np.zeros((b, t), dtype=np.bool_)
    for i, d in enumerate(datums):
        n, w = d.length, d.width
        input_ids[i, :n] = d.tokens
        mask[i, :n] = 1
        targets[i, :n, :w] = d.targets.reshape(n, w)
        ce[i, :n, :w] = 1.0 if d.weights is None else d.weights.reshape(n, w)
        if d.advantages is not None and d.sampler_logprobs is not None:
            q[i, :n] = d.sampler_logprobs
            adv[i, :n] = d.advantages
            w1 = 1.0 if d.weights is None else d.weights
            coef[i, :n] = np.where(d.advantages != 0, w1, 0.0)
        if d.ratio_positions is not None:
            in_ratio[i, :n] = d.ratio_positions

    def put(a: npt.NDArray[Any]) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return Batch(
        input_ids=put(input_ids),
        attention_mask=put(mask),
        targets=put(targets),
        ce_weights=put(ce),
        sampler_logprobs=put(q),
        advantages=put(adv),
        rl_coef=put(coef),
        ratio_mask=put(in_ratio),
        datums=datums,
    )


def split_by_budget(
    datums: Sequence[DatumArrays], max_cells: int, vocab_size: int
) -> list[list[int]]:
    """Group datum indices, in order, into micro-batches whose padded logits
    (``B * T * vocab``) stay under ``max_cells``; a datum too big alone gets its own.

    Bounding the logits keeps memory flat for long requests and large vocabularies.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, d in enumerate(datums):
        longest_if_added = max(longest, d.length)
        if current and (len(current) + 1) * longest_if_added * vocab_size > max_cells:
            groups.append(current)
            current, longest_if_added = [], d.length
        current.append(i)
        longest = longest_if_added
    if current:
        groups.append(current)
    return groups
