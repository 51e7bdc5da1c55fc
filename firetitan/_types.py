"""Small public value types that are firetitan's own (the data types are tinker's)."""

from __future__ import annotations

import enum

import attrs

__all__ = ["GradAccNormalization", "SaveSamplerResult"]


class GradAccNormalization(enum.StrEnum):
    """How `optim_step` normalizes the gradient accumulated since the last step.

    ``NUM_LOSS_TOKENS`` divides by the number of loss tokens (a per-token mean),
    ``NUM_SEQUENCES`` by the number of sequences with at least one loss token, and
    ``NONE`` uses the raw sum, as does passing no normalization at all.
    """

    NUM_LOSS_TOKENS = "num_loss_tokens"
    NUM_SEQUENCES = "num_sequences"
    NONE = "none"


@attrs.frozen
class SaveSamplerResult:
    """What `save_weights_for_sampler_ext` returns.

    Attributes:
        path: The trainer's path for the export (pass it to `create_sampling_client`).
        snapshot_name: The session-scoped snapshot name, ``<name>-<8 hex>``.
    """

    path: str
    snapshot_name: str
