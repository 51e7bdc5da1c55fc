"""Drives a trainer with the public Fireworks training SDK, unchanged; run as a child
process by ``test_fireworks_sdk.py`` (``sdk_child`` says why and how).

Output: what the parent test checks, including every WARNING-or-worse record the SDK
logged.

The SDK takes its own data types (``fireworks.training.sdk.types``); it refuses tinker's
``AdamParams`` when it validates the request, so everything is built with the SDK's types,
as its users do.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from fireworks.training.sdk import AdamParams
from fireworks.training.sdk import types as fw
from shared import BASE_MODEL, shifted_datum

from tests.compat.fireworks_child import fireworks_model
from tests.compat.sdk_child import run_child


def datum(tokens: list[int]) -> fw.Datum:
    return shifted_datum(fw, tokens)


def sum_of_logprobs(
    data: list[fw.Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    loss = torch.stack([-lp.sum() for lp in logprobs]).sum()
    return loss, {"user_loss": float(loss.detach())}


def documented_flow(base_url: str, api_key: str) -> dict[str, Any]:
    """The flow of the SDK's documentation, end to end."""
    out: dict[str, Any] = {}
    with fireworks_model(base_url, api_key) as (service, client):
        out["model_id"] = client.model_id
        try:
            service.create_training_client(BASE_MODEL, lora_rank=0)
            out["duplicate_error"] = None
        except ValueError as exc:
            out["duplicate_error"] = str(exc)

        data = [datum([1, 2, 3, 4]), datum([5, 6, 7])]
        forward = client.forward(data, "cross_entropy").result()
        out["forward_logprobs"] = [o["logprobs"].data for o in forward.loss_fn_outputs]
        out["forward_metrics"] = forward.metrics

        # Pipelined: both submitted before either result is read.
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(
            AdamParams(learning_rate=1e-4), grad_accumulation_normalization="num_loss_tokens"
        )
        out["fb_metrics"] = fb.result().metrics
        out["optim_metrics"] = opt.result().metrics

        custom = client.forward_backward_custom(data, sum_of_logprobs).result()
        out["custom_metrics"] = custom.metrics

        out["save_path"] = client.save_state("step-1").result().path
        out["checkpoints"] = client.list_checkpoints()
        load = client.load_state_with_optimizer(client.resolve_checkpoint_path("step-1"))
        out["load_path"] = load.result().path

        base = client.save_weights_for_sampler_ext("sampler", checkpoint_type="base")
        delta = client.save_weights_for_sampler_ext("sampler-2", checkpoint_type="delta")
        out["sampler"] = [[base.path, base.snapshot_name], [delta.path, delta.snapshot_name]]
    return out


def failing_request(base_url: str, api_key: str) -> dict[str, Any]:
    """A request the trainer refuses while running it, then one that succeeds."""
    out: dict[str, Any] = {}
    with fireworks_model(base_url, api_key) as (_service, client):
        out["model_id"] = client.model_id
        bad = fw.Datum(
            model_input=fw.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": fw.TensorData(data=[1, 2], dtype="int64", shape=[2])},
        )
        try:
            client.forward([bad], "cross_entropy").result()
            out["failure"] = None
        except Exception as exc:  # the SDK's RequestFailedError
            out["failure"] = {
                "type": type(exc).__name__,
                "category": str(getattr(exc, "category", None)),
                "message": str(exc),
            }
        after = client.forward([datum([1, 2, 3])], "cross_entropy").result()
        out["outputs_after_failure"] = len(after.loss_fn_outputs)
    return out


def both_flows(base_url: str, api_key: str) -> dict[str, Any]:
    # The deliberate failure is expected to be logged by nobody; any SDK warning
    # (retries, validation trouble, telemetry failures) is a protocol problem.
    return {
        "documented_flow": documented_flow(base_url, api_key),
        "failing_request": failing_request(base_url, api_key),
    }


if __name__ == "__main__":
    sys.exit(run_child(both_flows, "fireworks", "tinker"))
