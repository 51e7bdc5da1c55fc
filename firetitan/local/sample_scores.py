"""The layout of a sample's extra logprob results, shared by both engines.

tinker 0.38 documents these results (``SampleRequest`` / ``SampleResponse``); engines
compute the numbers and build the result fields here, so the null and the torch engine
answer the same shapes:

* ``topk_prompt_logprobs_np``: (len(prompt), k) matrices; row ``i`` holds the k most
  likely tokens at prompt position ``i``, most likely first; row 0 (no context) is all
  sentinel cells (``token_id=0``, ``logprob=-99999``), which tinker reads as None.
* ``SampledSequence.topk_logprobs_np``: (num_tokens, k), row ``t`` at generated token ``t``.
* ``target_prompt_logprobs``: float32, the shape of the requested ids (len(prompt) - 1,
  K); cell ``[i, j]`` is the logprob of id ``[i, j]`` at prompt position ``i + 1``, 0.0
  where the request had ``-1``.
* ``prompt_alt_tokens``: two (len(prompt) - 1, k) tensors, int64 draws and their
  logprobs.

Every logprob is the model's own (``log_softmax`` of the unmodified logits), like the
sampled tokens' logprobs: it equals what ``forward`` computes for the same token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import tinker
from tinker.types import PromptAltTokens
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from firetitan._wire import csr_cells

__all__ = [
    "alt_tokens",
    "in_request_layout",
    "mask_topk_rows",
    "prompt_topk",
    "requested_ids",
    "target_logprobs",
    "topk",
]


def topk(ids: npt.ArrayLike, logprobs: npt.ArrayLike) -> TopkLogprobs:
    """(n, k) ids and logprobs, most likely first, as tinker's matrices."""
    return TopkLogprobs(
        token_ids=np.asarray(ids, dtype=np.int32),
        logprobs=np.asarray(logprobs, dtype=np.float32),
    )


def prompt_topk(ids: npt.ArrayLike, logprobs: npt.ArrayLike) -> TopkLogprobs:
    """The (len(prompt) - 1, k) top-k of prompt positions 1.. with position 0's empty row
    in front."""
    ids_arr = np.asarray(ids, dtype=np.int32)
    lps_arr = np.asarray(logprobs, dtype=np.float32)
    k = ids_arr.shape[1]
    return topk(
        np.concatenate([np.zeros((1, k), dtype=np.int32), ids_arr]),
        np.concatenate([np.full((1, k), MASK_LOGPROB, dtype=np.float32), lps_arr]),
    )


def target_logprobs(targets: npt.NDArray[np.int64], scored: npt.ArrayLike) -> tinker.TensorData:
    """The result tensor of ``target_prompt_logprobs``: ``scored`` (the logprob of each
    requested id, any value where nothing was requested) with 0.0 in the ``-1`` cells."""
    values = np.where(targets >= 0, np.asarray(scored, dtype=np.float32), np.float32(0.0))
    return tinker.TensorData(
        data=values.astype(np.float32), dtype="float32", shape=list(targets.shape)
    )


def alt_tokens(tokens: npt.ArrayLike, logprobs: npt.ArrayLike) -> PromptAltTokens:
    """``prompt_alt_tokens`` from (len(prompt) - 1, k) draws and their logprobs."""
    tok = np.asarray(tokens, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float32)
    return PromptAltTokens(
        tokens=tinker.TensorData(data=tok, dtype="int64", shape=list(tok.shape)),
        logprobs=tinker.TensorData(data=lps, dtype="float32", shape=list(lps.shape)),
    )


def mask_topk_rows(matrices: TopkLogprobs, keep_last: int) -> TopkLogprobs:
    """Empty every row but the last ``keep_last`` (``prompt_logprobs_last_n``)."""
    ids = np.array(matrices.token_ids, dtype=np.int32)
    lps = np.array(matrices.logprobs, dtype=np.float32)
    cut = max(ids.shape[0] - keep_last, 0)
    ids[:cut] = 0
    lps[:cut] = MASK_LOGPROB
    return topk(ids, lps)


def requested_ids(tensor: tinker.TensorData) -> npt.NDArray[Any]:
    """The dense (len(prompt) - 1, K) ids of a request's ``target_prompt_logprobs``:
    a CSR tensor's unlisted cells ask for nothing (``-1``). The values keep the dtype
    they were sent with, for `rules.check_sampling` to refuse anything but integers."""
    if tensor.sparse_crow_indices is None or tensor.sparse_col_indices is None:
        return np.asarray(tensor.to_numpy())
    values = np.asarray(tensor.data, dtype=tensor.dtype).reshape(-1)
    dense = np.full([int(d) for d in tensor.shape or (0, 0)], -1, dtype=values.dtype)
    dense[csr_cells(tensor.sparse_crow_indices, tensor.sparse_col_indices)] = values
    return dense


def in_request_layout(request: tinker.TensorData, result: tinker.TensorData) -> tinker.TensorData:
    """The dense ``target_prompt_logprobs`` result in the layout of the request: a CSR
    request is answered in CSR with the same indices (only the cells it lists)."""
    if request.sparse_crow_indices is None or request.sparse_col_indices is None:
        return result
    cells = csr_cells(request.sparse_crow_indices, request.sparse_col_indices)
    return tinker.TensorData(
        data=np.asarray(result.to_numpy(), dtype=np.float32)[cells],
        dtype="float32",
        shape=list(result.shape or []),
        sparse_crow_indices=list(request.sparse_crow_indices),
        sparse_col_indices=list(request.sparse_col_indices),
    )
