"""Stability records: what ``stable_reinforce`` trains on, kept by the trainer at sampling.

tinker's ``stable_reinforce`` loss does not trust the client with the sampler's
log-probabilities. A sampling request with ``record_stability_info`` makes the trainer
keep, per sampled sequence (by the ``sequence_id`` the ACK handed out), the prompt, the
sampled tokens and their log-probabilities. A ``stable_reinforce`` datum then carries
provenance spans (tinker's ``Datum.with_provenance``): consecutive runs tiling its
``target_tokens``, each naming a sequence and an offset into its prompt
(``PromptProvenanceSpan``) or its sampled tokens (``SampledProvenanceSpan``).

`StabilityRecords.resolve` checks every claim against the records (same client session,
same tokens, advantages only on sampled tokens) and replaces the datum's ``logprobs``
input by the recorded ones, so that the loss sees exactly what the sampler computed.
Records are bounded in number and expire a day after their last use, as tinker
documents.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt
import tinker
from tinker.types.provenance_spans import SampledProvenanceSpan

from firetitan.local.engine import UserError

__all__ = ["LOSS", "StabilityRecords"]

#: The loss that reads stability records.
LOSS: Final = "stable_reinforce"
#: Records expire this long after their last use.
EXPIRY_SECONDS: Final = 86_400.0
#: The most sequences remembered; the least recently used go first.
MAX_SEQUENCES: Final = 100_000


@attrs.frozen
class _Sequence:
    session_id: str
    prompt: npt.NDArray[np.int64]
    tokens: npt.NDArray[np.int64]
    logprobs: npt.NDArray[np.float32]


class StabilityRecords:
    """Sampled sequences kept for ``stable_reinforce`` (thread-safe: written by the
    engine thread after a sample, read by it before a training step)."""

    def __init__(
        self, max_sequences: int = MAX_SEQUENCES, expiry_seconds: float = EXPIRY_SECONDS
    ) -> None:
        self._max = max_sequences
        self._expiry = expiry_seconds
        self._lock = threading.Lock()
        self._records: collections.OrderedDict[str, tuple[_Sequence, float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._records)

    def record(
        self,
        session_id: str,
        sequence_ids: Sequence[str],
        prompt: Sequence[int],
        response: tinker.SampleResponse,
    ) -> None:
        """Keep a sample's sequences under the ids its ACK handed out."""
        prompt_array = np.asarray(prompt, dtype=np.int64)
        now = time.monotonic()
        with self._lock:
            for sequence_id, seq in zip(sequence_ids, response.sequences, strict=True):
                logprobs = seq.logprobs if seq.logprobs is not None else []
                kept = _Sequence(
                    session_id,
                    prompt_array,
                    np.asarray(seq.tokens, dtype=np.int64),
                    np.asarray(logprobs, dtype=np.float32),
                )
                self._records[sequence_id] = (kept, now)
                self._records.move_to_end(sequence_id)
            self._evict(now)

    def _evict(self, now: float) -> None:
        while self._records and (
            len(self._records) > self._max
            or now - next(iter(self._records.values()))[1] > self._expiry
        ):
            self._records.popitem(last=False)

    def _get(self, sequence_id: str, session_id: str, where: str) -> _Sequence:
        now = time.monotonic()
        with self._lock:
            self._evict(now)
            found = self._records.get(sequence_id)
            if found is None or found[0].session_id != session_id:
                raise UserError(
                    f"{where}: no stability record for sequence {sequence_id!r} in this "
                    "session; sample it with record_stability_info=True first"
                )
            self._records[sequence_id] = (found[0], now)
            self._records.move_to_end(sequence_id)
            return found[0]

    def resolve(self, session_id: str, data: Sequence[tinker.Datum]) -> list[tinker.Datum]:
        """``data`` with every datum's ``logprobs`` taken from the records its provenance
        names.

        Raises:
            UserError: A datum without provenance, spans that do not tile its targets,
                an unknown or foreign sequence, tokens that differ from the record, or
                a nonzero advantage on a prompt token; the message names the datum.
        """
        return [self._resolve_one(session_id, i, d) for i, d in enumerate(data)]

    def _resolve_one(self, session_id: str, index: int, datum: tinker.Datum) -> tinker.Datum:
        where = f"datum {index}"
        spans = datum.loss_fn_input_spans
        if spans is None:
            raise UserError(
                f"{where}: {LOSS} needs provenance (Datum.with_provenance) naming the "
                "sampled sequences behind its targets"
            )
        inputs = datum.loss_fn_inputs
        for key in ("target_tokens", "advantages"):
            if key not in inputs:
                raise UserError(f"{where}: loss_fn_inputs is missing {key!r}, required by {LOSS}")
        targets = np.asarray(inputs["target_tokens"].to_numpy()).reshape(-1).astype(np.int64)
        advantages = np.asarray(inputs["advantages"].to_numpy(), dtype=np.float32).reshape(-1)
        if sum(span.length for span in spans) != targets.size:
            raise UserError(
                f"{where}: loss_fn_input_spans cover {sum(s.length for s in spans)} positions; "
                f"target_tokens has {targets.size}"
            )
        sampler = np.zeros(targets.size, dtype=np.float32)
        pos = 0
        for j, span in enumerate(spans):
            at = f"{where}: loss_fn_input_spans[{j}]"
            record = self._get(span.sequence_id, session_id, at)
            sampled = isinstance(span, SampledProvenanceSpan)
            source = record.tokens if sampled else record.prompt
            end = span.offset + span.length
            if end > source.size:
                what = "sampled tokens" if sampled else "prompt tokens"
                raise UserError(
                    f"{at} reaches position {end} of {span.sequence_id!r}, which has "
                    f"{source.size} {what}"
                )
            window = slice(pos, pos + span.length)
            if not np.array_equal(targets[window], source[span.offset : end]):
                raise UserError(
                    f"{at}: target_tokens[{pos}:{pos + span.length}] differ from the tokens "
                    f"recorded for {span.sequence_id!r}"
                )
            if sampled:
                sampler[window] = record.logprobs[span.offset : end]
            elif np.any(advantages[window] != 0):
                raise UserError(
                    f"{at}: advantages must be 0 on prompt tokens "
                    f"(positions {pos}-{pos + span.length - 1})"
                )
            pos += span.length
        logprobs = tinker.TensorData.from_numpy(sampler)
        return dataclasses.replace(datum, loss_fn_inputs={**inputs, "logprobs": logprobs})
