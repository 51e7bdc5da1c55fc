"""Request validation and batching: tinker datums -> checked numpy arrays -> one padded batch.

Validation runs over the whole request before any model compute, so a bad datum fails
the request with a `UserError` naming the datum index and the field, and nothing is
accumulated. Batching right-pads every datum to the longest one; with a causal model
and right padding, real positions never attend to padding, and padded positions carry
zero loss coefficients (so zero gradient).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import tinker
import torch

from firetitan.local.engine import UserError

__all__ = [
    "LOSS_INPUTS",
    "RL_LOSSES",
    "Batch",
    "DatumArrays",
    "collate",
    "parse_datums",
    "split_by_budget",
]

#: Required ``loss_fn_inputs`` per built-in loss. ``weights`` is optional for all.
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    # logprobs come from the trainer's stability records (firetitan.local.stability)
    "stable_reinforce": ("target_tokens", "logprobs", "advantages"),
}
RL_LOSSES = frozenset(LOSS_INPUTS) - {"cross_entropy"}

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@attrs.frozen(eq=False)
class DatumArrays:
    """One validated datum.

    Attributes:
        tokens: ``model_input`` token ids, shape (N,).
        targets: ``target_tokens``, shape (N,) or (N, K) for the top-K form.
        weights: ``weights`` (same shape as ``targets``), or None when absent.
        sampler_logprobs: ``logprobs`` (N,) for RL losses, else None.
        advantages: ``advantages`` (N,) for RL losses, else None.
        loss_positions: (N,) bool: positions whose term can carry gradient.
    """

    tokens: IntArray
    targets: IntArray
    weights: FloatArray | None
    sampler_logprobs: FloatArray | None
    advantages: FloatArray | None
    loss_positions: npt.NDArray[np.bool_]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        """K for top-K targets, 1 for plain (N,) targets."""
        return int(self.targets.shape[1]) if self.targets.ndim == 2 else 1


def parse_datums(
    data: Sequence[tinker.Datum], loss_fn: str, *, vocab_size: int, max_length: int
) -> list[DatumArrays]:
    """Validate a request's datums for ``loss_fn``.

    Raises:
        UserError: Unknown loss, or a datum with a missing input, a wrong shape or
            dtype, an unsupported chunk, a token id outside ``[0, vocab_size)``, a
            sequence longer than ``max_length``, or a non-finite value. The message
            names the datum index and the field.
    """
    if loss_fn not in LOSS_INPUTS:
        raise UserError(f"unknown loss_fn {loss_fn!r}; built-in losses: {sorted(LOSS_INPUTS)}")
    return [
        _parse_one(i, datum, loss_fn, vocab_size=vocab_size, max_length=max_length)
        for i, datum in enumerate(data)
    ]


def _parse_one(
    index: int, datum: tinker.Datum, loss_fn: str, *, vocab_size: int, max_length: int
) -> DatumArrays:
    where = f"datum {index}"
    tokens = _tokens(where, datum.model_input, vocab_size, max_length)
    n = tokens.shape[0]
    inputs: Mapping[str, Any] = datum.loss_fn_inputs
    for key in LOSS_INPUTS[loss_fn]:
        if key not in inputs:
            raise UserError(f"{where}: loss_fn_inputs is missing {key!r}, required by {loss_fn}")

    rl = loss_fn in RL_LOSSES
    targets = _array(where, "target_tokens", inputs["target_tokens"], integer=True)
    if rl and targets.ndim != 1:
        raise UserError(
            f"{where}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"{loss_fn} takes one target per position, shape [{n}]"
        )
    if (
        targets.ndim not in (1, 2)
        or targets.shape[0] != n
        or (targets.ndim == 2 and targets.shape[1] == 0)
    ):
        raise UserError(
            f"{where}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"expected [{n}] or [{n}, K] (model_input length {n})"
        )
    _check_ids(where, "loss_fn_inputs['target_tokens']", targets, vocab_size)
    target_ints = targets.astype(np.int64, copy=False)

    weights = None
    if "weights" in inputs:
        weights = _float(where, "weights", inputs["weights"], list(targets.shape))
    sampler_logprobs = advantages = None
    if rl:
        sampler_logprobs = _float(where, "logprobs", inputs["logprobs"], [n])
        advantages = _float(where, "advantages", inputs["advantages"], [n])

    # Loss positions (losses.md): w != 0 for cross_entropy (any of the K entries for
    # the top-K form); A != 0, and w != 0 when weights are given, for RL losses.
    if rl:
        assert advantages is not None
        positions = advantages != 0
        if weights is not None:
            positions &= weights != 0
    elif weights is None:
        positions = np.ones(n, dtype=np.bool_)
    else:
        nonzero = weights != 0
        positions = nonzero if nonzero.ndim == 1 else nonzero.any(axis=1)
    return DatumArrays(
        tokens=tokens,
        targets=target_ints,
        weights=weights,
        sampler_logprobs=sampler_logprobs,
        advantages=advantages,
        loss_positions=positions,
    )


def _tokens(
    where: str, model_input: tinker.ModelInput, vocab_size: int, max_length: int
) -> IntArray:
    parts: list[IntArray] = []
    for j, chunk in enumerate(model_input.chunks):
        if not isinstance(chunk, tinker.EncodedTextChunk):
            kind = getattr(chunk, "type", type(chunk).__name__)
            raise UserError(
                f"{where}: model_input chunk {j} is of type {kind!r}; this trainer "
                "accepts encoded_text chunks only"
            )
        try:
            parts.append(np.asarray(chunk.tokens, dtype=np.int64).reshape(-1))
        except (OverflowError, ValueError, TypeError) as exc:
            raise UserError(f"{where}: model_input chunk {j} holds a non-integer token id") from exc
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.shape[0] == 0:
        raise UserError(f"{where}: model_input is empty")
    if tokens.shape[0] > max_length:
        raise UserError(
            f"{where}: model_input has {tokens.shape[0]} tokens; the model's context is "
            f"{max_length}"
        )
    _check_ids(where, "model_input", tokens, vocab_size)
    return tokens


def _array(where: str, key: str, value: Any, *, integer: bool) -> npt.NDArray[Any]:
    field = f"loss_fn_inputs[{key!r}]"
    if not isinstance(value, tinker.TensorData):
        raise UserError(f"{where}: {field} is not a tensor")
    try:
        arr = np.asarray(value.to_numpy())
        if value.shape is not None:
            arr = arr.reshape(value.shape)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"{where}: {field} is malformed: {exc}") from exc
    if integer and arr.dtype.kind not in "iu":
        raise UserError(f"{where}: {field} must be int64, got {value.dtype}")
    if arr.dtype.kind not in "iuf":
        raise UserError(f"{where}: {field} must be numeric, got {value.dtype}")
    return arr


def _float(where: str, key: str, value: Any, shape: list[int]) -> FloatArray:
    arr = _array(where, key, value, integer=False)
    field = f"loss_fn_inputs[{key!r}]"
    if list(arr.shape) != shape:
        raise UserError(
            f"{where}: {field} has shape {list(arr.shape)}; expected {shape} "
            "(it must match target_tokens / the model_input length)"
        )
    out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        pos = np.argwhere(bad)[0].tolist()
        raise UserError(f"{where}: {field} holds a non-finite value at index {pos}")
    return out


def _check_ids(where: str, field: str, ids: npt.NDArray[Any], vocab_size: int) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = np.argwhere(bad)[0].tolist()
        raise UserError(
            f"{where}: {field} holds token id {int(ids[tuple(pos)])} at index {pos}, "
            f"outside the vocabulary [0, {vocab_size})"
        )


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
        datums: The datums, in order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    ce_weights: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    rl_coef: torch.Tensor
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
