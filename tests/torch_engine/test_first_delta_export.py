"""What a ``delta`` sampler export is a delta of, end to end through the client.

A delta is the difference to the model's previous export, which its metadata names.
Requested as a model's first export (as right after a resume), there is no previous
export, so the trainer writes the full weights: the export loads to exactly the current
weights, and its metadata says so.
"""

from __future__ import annotations

import tinker
import torch
from shared import BASE_MODEL

from firetitan import FiretitanServiceClient, FiretitanTrainingClient, GradAccNormalization
from firetitan.local import LocalTrainer
from firetitan.local.torch import TorchEngine, rebuild_snapshot
from firetitan.local.torch.models import unique_state

from .helpers import bit_equal, sft_datum


def _step(tc: FiretitanTrainingClient, text: str) -> None:
    tc.forward_backward([sft_datum(text)], "cross_entropy").result(60)
    adam = tinker.AdamParams(learning_rate=3e-3)
    tc.optim_step(adam, GradAccNormalization.NUM_LOSS_TOKENS).result(60)


def test_a_first_delta_export_loads_to_exactly_the_current_weights() -> None:
    engine = TorchEngine(size="tiny", device="cpu", seed=0)
    with (
        LocalTrainer(engine, base_model=BASE_MODEL) as trainer,
        FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key) as service,
    ):
        store = trainer.server.store
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        _step(tc, "trained away from the base weights")

        def current() -> dict[str, torch.Tensor]:
            return dict(unique_state(engine.module(tc.model_id)))

        first = tc.save_weights_for_sampler_ext("first", checkpoint_type="delta")
        first_dir, manifest = store.resolve("sampler", first.path)
        assert manifest.metadata["requested_checkpoint_type"] == "delta"
        assert manifest.metadata["checkpoint_type"] == "base"
        assert manifest.metadata["delta_of"] is None
        assert "full weights" in manifest.metadata["fallback_reason"]
        assert bit_equal(rebuild_snapshot(first_dir), current())

        # The next delta is the difference to that export, and names it.
        _step(tc, "and further")
        second = tc.save_weights_for_sampler_ext("second", checkpoint_type="delta")
        second_dir, manifest = store.resolve("sampler", second.path)
        assert manifest.metadata["checkpoint_type"] == "delta"
        assert manifest.metadata["delta_of"] == first_dir.name
        assert bit_equal(rebuild_snapshot(second_dir), current())
