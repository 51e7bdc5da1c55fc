"""Drives tinker 0.38's server-side custom losses, unchanged: ``create_custom_loss``
uploads the traced loss and ``forward_backward_custom`` runs it on the trainer. Run as
a child process by ``test_tinker_custom_loss.py`` (``sdk_child`` says why).

Three LoRA models start from the same weights (same seed) and take one step each: one
with the uploaded loss, one with the same traced loss run client-side by tinker (its
handle without a ``loss_id``), one with the equivalent built-in loss. Output: each
step's metrics and each model's logprobs after the step, for the parent to compare.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import tinker
import torch
from shared import BASE_MODEL
from tinker import types

from tests.compat.sdk_child import run_child

ADAM = types.AdamParams(learning_rate=1e-2)
SEQUENCES = [[1, 72, 105, 33, 10, 2], [1, 79, 107, 2]]
ADVANTAGES = [[1.0, -0.5, 0.0, 2.0, 0.25], [-1.0, 0.5, 1.5]]


def importance_sampling(logprobs: Any, sampler: Any, advantages: Any) -> Any:
    """The built-in ``importance_sampling``, written as a custom loss."""
    ratio = torch.exp(logprobs - sampler)
    loss = -(ratio * advantages).sum()
    return loss, {
        "custom/ratio:mean": ratio.mean(),
        "custom/active:sum": (advantages != 0).float().sum(),
    }


def _tensor(values: list[float], dtype: str = "float32") -> types.TensorData:
    return types.TensorData(data=values, dtype=dtype, shape=[len(values)])  # type: ignore[arg-type]


def data(sampler_key: str) -> list[types.Datum]:
    """RL datums whose sampler logprobs sit under ``sampler_key``."""
    out = []
    for tokens, advantages in zip(SEQUENCES, ADVANTAGES, strict=True):
        n = len(tokens) - 1
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": _tensor(tokens[1:], "int64"),
                    sampler_key: _tensor([-5.5 + 0.1 * i for i in range(n)]),
                    "advantages": _tensor(advantages),
                },
            )
        )
    return out


def logprobs_after(client: tinker.TrainingClient) -> list[list[float]]:
    """The model's logprobs of `SEQUENCES`, by a forward pass now."""
    probe = [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": _tensor(tokens[1:], "int64")},
        )
        for tokens in SEQUENCES
    ]
    out = client.forward(probe, "cross_entropy").result()
    return [o["logprobs"].tolist() for o in out.loss_fn_outputs]


def three_steps(base_url: str, api_key: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    with tinker.ServiceClient(base_url=base_url, api_key=api_key) as service:
        server, client_side, builtin = (
            service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=3).result()
            for _ in range(3)
        )
        ranks: dict[str, types.CustomLossInputRank] = {"logprobs": 1, "sampler": 1, "advantages": 1}
        handle = service.create_custom_loss(importance_sampling, ranks).result()
        summary["loss_id"] = handle.loss_id
        summary["model_ids"] = [server.model_id, client_side.model_id, builtin.model_id]
        summary["logprobs_before"] = logprobs_after(builtin)  # the same start for all three
        local_handle = dataclasses.replace(handle, loss_id=None)
        steps = {
            "server": server.forward_backward_custom(data("sampler"), handle),
            "client": client_side.forward_backward_custom(data("sampler"), local_handle),
            "builtin": builtin.forward_backward(data("logprobs"), "importance_sampling"),
        }
        summary["metrics"] = {name: fb.result().metrics for name, fb in steps.items()}
        for training in (server, client_side, builtin):
            training.optim_step(ADAM).result()
        summary["logprobs"] = {
            "server": logprobs_after(server),
            "client": logprobs_after(client_side),
            "builtin": logprobs_after(builtin),
        }
    return summary


if __name__ == "__main__":
    sys.exit(run_child(three_steps, "tinker"))
