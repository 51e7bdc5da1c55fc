"""Supervised fine-tuning through the public Fireworks training SDK, unchanged; run as a
child process by ``test_fireworks_sft.py`` (``sdk_child`` says why and how).

Input on stdin, as JSON: ``{"base_model": ..., "corpus": [tokens, ...], "steps": N,
"learning_rate": lr}``, token ids of the trainer's tokenizer, built by the parent (this
process imports no trainer code). Output: the corpus NLL before and after ``N`` full-parameter
SFT steps, and every WARNING-or-worse record the SDK logged.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

from fireworks.training.sdk import AdamParams, FiretitanTrainingClient
from fireworks.training.sdk import types as fw
from shared import next_token_datum

from tests.compat.fireworks_child import fireworks_model
from tests.compat.sdk_child import run_child


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


def sft(given: dict[str, Any], base_url: str, api_key: str) -> dict[str, Any]:
    """Measure the corpus NLL, train on the corpus, measure it again.

    Steps are pipelined the way SDK users write them: each step's forward_backward and
    optim_step are submitted before the previous step's results are read.
    """
    data = [next_token_datum(fw, tokens) for tokens in given["corpus"]]
    adam = AdamParams(learning_rate=given["learning_rate"], weight_decay=0.0, grad_clip_norm=1.0)
    out: dict[str, Any] = {}
    with fireworks_model(base_url, api_key, given["base_model"]) as (_service, client):
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
    return out


if __name__ == "__main__":
    sys.exit(run_child(functools.partial(sft, json.load(sys.stdin)), "fireworks", "tinker"))
