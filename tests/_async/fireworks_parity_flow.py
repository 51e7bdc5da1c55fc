"""The wire-parity flow, driven by the public Fireworks training SDK (fireworks-ai
1.2.30), unchanged. Run as a child process by ``test_wire_parity.py``: the SDK keeps a
daemon event-loop thread for the life of its process.

Input: the trainer's address, from ``tests/compat/sdk_child.child_environment``. The
same steps are in ``test_wire_parity.firetitan_flow``; keep the two in step.
"""

from __future__ import annotations

import sys

from fireworks.training.sdk import AdamParams
from fireworks.training.sdk import types as fw
from shared import shifted_datum

from tests.compat.fireworks_child import fireworks_model
from tests.compat.sdk_child import trainer_address

TOKENS = [[1, 2, 3, 4], [5, 6, 7]]


def main() -> int:
    base_url, api_key = trainer_address()
    with fireworks_model(base_url, api_key, user_metadata={"run": "parity"}) as (_, client):
        data = [shifted_datum(fw, t) for t in TOKENS]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
