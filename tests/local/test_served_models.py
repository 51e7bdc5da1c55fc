"""A trainer refuses a base model it does not serve, and says which ones it serves."""

from __future__ import annotations

import pytest
import tinker

from firetitan import FiretitanServiceClient, RequestFailedError
from firetitan.local import LocalTrainer

from .helpers import BASE_MODEL

OTHER = "accounts/fireworks/models/gpt-oss-20b"


def test_an_unserved_base_model_is_refused_with_the_served_list() -> None:
    with (
        LocalTrainer("null", base_model=BASE_MODEL) as trainer,
        FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key) as service,
    ):
        with pytest.raises(RequestFailedError) as created:
            service.create_training_client(base_model=OTHER, lora_rank=0)
        assert created.value.category == "user"
        message = str(created.value)
        assert f"base_model {OTHER!r} is not served by this trainer" in message
        assert repr(BASE_MODEL) in message

        with pytest.raises(RequestFailedError, match="is not served by this trainer"):
            service.create_base_training_client(OTHER)

        sampler = service.create_sampling_client(base_model=OTHER)
        prompt = tinker.ModelInput.from_ints([1, 2, 3])
        params = tinker.SamplingParams(max_tokens=2)
        with pytest.raises(RequestFailedError, match=f"base_model {OTHER!r} is not served"):
            sampler.sample(prompt, 1, params).result(30)

        # What it serves still works, on the same session.
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        assert tc.base_model == BASE_MODEL
        sampled = service.create_sampling_client(base_model=BASE_MODEL).sample(prompt, 1, params)
        assert len(sampled.result(30).sequences) == 1
