"""(child) A model through the public Fireworks training SDK, as every Fireworks flow
opens one; the service client is closed on the way out, whatever happens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fireworks.training.sdk import FiretitanServiceClient, FiretitanTrainingClient
from shared import BASE_MODEL


@contextlib.contextmanager
def fireworks_model(
    base_url: str, api_key: str, base_model: str = BASE_MODEL, **service_options: Any
) -> Iterator[tuple[FiretitanServiceClient, FiretitanTrainingClient]]:
    """A service client (``service_options``: its other arguments) and a full-parameter
    model on ``base_model``."""
    service = FiretitanServiceClient(base_url=base_url, api_key=api_key, **service_options)
    try:
        yield service, service.create_training_client(base_model, lora_rank=0)
    finally:
        service.close()
