"""Supervised fine-tuning through the public Fireworks training SDK, unchanged; run as a
child process by ``test_fireworks_sft.py`` (``sdk_child`` says why and how).

Input on stdin, as JSON: ``{"base_model": ..., "corpus": [tokens, ...], "steps": N,
"learning_rate": lr}``, token ids of the trainer's tokenizer, built by the parent (this
process imports no trainer code). Output: the corpus NLL before and after ``N`` full-parameter
SFT steps, and every WARNING-or-worse record the SDK logged.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fireworks.training.sdk import AdamParams, FiretitanServiceClient, FiretitanTrainingClient
from fireworks.training.sdk import types as fw

from tests.compat.sdk_child import SdkProblems, report, trainer_address


def sft_datum(tokens: list[int]) -> fw.Datum:
    """Next-token prediction on every position: inputs ``tokens[:-1]``, targets
    ``tokens[1:]``, weight 1 each."""
    n = len(tokens) - 1
    return fw.Datum(
        model_input=fw.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": fw.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": fw.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def corpus_nll(client: FiretitanTrainingClient, data: list[fw.Datum]) -> float:
    """Mean negative log-likelihood per weighted target token, from a forward pass."""
    out = client.forward(data, "cross_entropy").result()
    total = count = 0.0
    for datum, output in zip(data, out.loss_fn_outputs, strict=True):
        weights = datum.loss_fn_inputs["weights"].data
        logprobs = output["logprobs"].data
        total -= sum(w * lp for w, lp in zip(weights, logprobs, strict=True))
        count += sum(weights)
    return total / count


def sft(base_url: str, api_key: str, given: dict[str, Any]) -> dict[str, Any]:
    """Measure the corpus NLL, train on the corpus, measure it again.

    Steps are pipelined the way SDK users write them: each step's forward_backward and
    optim_step are submitted before the previous step's results are read.
    """
    data = [sft_datum(tokens) for tokens in given["corpus"]]
    adam = AdamParams(learning_rate=given["learning_rate"], weight_decay=0.0, grad_clip_norm=1.0)
    out: dict[str, Any] = {}
    service = FiretitanServiceClient(base_url=base_url, api_key=api_key)
    try:
        client = service.create_training_client(given["base_model"], lora_rank=0)
        out["model_id"] = client.model_id
        out["nll_before"] = corpus_nll(client, data)
        losses: list[float] = []
        pending = None
        for _step in range(given["steps"]):
            fb = client.forward_backward(data, "cross_entropy")
            opt = client.optim_step(adam, grad_accumulation_normalization="num_loss_tokens")
            if pending is not None:
                losses.append(pending[0].result().metrics["loss:sum"])
                pending[1].result()
            pending = (fb, opt)
        if pending is not None:
            losses.append(pending[0].result().metrics["loss:sum"])
            pending[1].result()
        out["fb_losses"] = losses
        out["nll_after"] = corpus_nll(client, data)
    finally:
        service.close()
    return out


def main() -> int:
    collect = SdkProblems("fireworks", "tinker").install()
    base_url, api_key = trainer_address()
    summary = sft(base_url, api_key, json.load(sys.stdin))
    summary["sdk_problems"] = collect.problems
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
