"""The wire-parity flow, driven by the public Fireworks training SDK (fireworks-ai
1.2.30), unchanged. Run as a child process by ``test_wire_parity.py``: the SDK keeps a
daemon event-loop thread for the life of its process.

Input: ``FIRETITAN_TEST_BASE_URL`` and ``FIRETITAN_TEST_API_KEY`` in the environment.
The same steps are in ``test_wire_parity.firetitan_flow``; keep the two in step.
"""

from __future__ import annotations

import os
import sys

from fireworks.training.sdk import AdamParams, FiretitanServiceClient
from fireworks.training.sdk import types as fw

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
TOKENS = [[1, 2, 3, 4], [5, 6, 7]]


def datum(tokens: list[int]) -> fw.Datum:
    n = len(tokens)
    return fw.Datum(
        model_input=fw.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": fw.TensorData(data=[*tokens[1:], 0], dtype="int64", shape=[n]),
            "weights": fw.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def main() -> int:
    service = FiretitanServiceClient(
        base_url=os.environ["FIRETITAN_TEST_BASE_URL"],
        api_key=os.environ["FIRETITAN_TEST_API_KEY"],
        user_metadata={"run": "parity"},
    )
    try:
        client = service.create_training_client(BASE_MODEL, lora_rank=0)
        data = [datum(t) for t in TOKENS]
        client.forward(data, "cross_entropy").result()
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(
            AdamParams(learning_rate=1e-4), grad_accumulation_normalization="num_loss_tokens"
        )
        fb.result()
        opt.result()
        client.save_state("step-1").result()
        client.list_checkpoints()
        client.load_state_with_optimizer(client.resolve_checkpoint_path("step-1")).result()
        client.save_weights_for_sampler_ext("sampler", checkpoint_type="base")
        client.get_info()
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
