"""Drives a trainer with the public ``tinker`` 0.38 SDK, unchanged; run as a child process
by ``test_tinker_sdk.py`` (``sdk_child`` says why and how).

Input on stdin, as JSON: ``{"base_model": ..., "sft": [[tokens, weights], ...],
"prompt": [tokens]}``, token ids of the trainer's tokenizer, built by the parent (this
process imports no trainer code). Output: what the parent test checks, including every
WARNING-or-worse record the SDK logged.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
import tinker
from shared import next_token_datum
from tinker import types

from tests.compat.sdk_child import SdkProblems, report, trainer_address

ADAM = types.AdamParams(learning_rate=1e-4)


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    return next_token_datum(types, tokens, weights)


def training_flow(service: tinker.ServiceClient, base_model: str) -> dict[str, Any]:
    """The training client's calls: pipelined steps, forward, save and resume."""
    out: dict[str, Any] = {}
    client = service.create_lora_training_client(base_model=base_model, rank=4).result()
    out["model_id"] = client.model_id
    data = [datum([1, 2, 3, 4, 5]), datum([6, 7, 8, 9])]

    # Pipelined: everything is submitted before the first result is read.
    fb1 = client.forward_backward(data, "cross_entropy")
    opt1 = client.optim_step(ADAM)
    fb2 = client.forward_backward(data, "cross_entropy")
    opt2 = client.optim_step(ADAM)
    out["fb_losses"] = [fb1.result().metrics["loss:sum"], fb2.result().metrics["loss:sum"]]
    out["optim_metrics"] = opt1.result().metrics
    opt2.result()

    forward = client.forward(data, "cross_entropy").result()
    out["forward_logprobs"] = [o["logprobs"].tolist() for o in forward.loss_fn_outputs]
    out["forward_loss"] = forward.metrics["loss:sum"]

    out["save_path"] = client.save_state("step-2").result().path
    resumed = service.create_training_client_from_state_with_optimizer(out["save_path"]).result()
    out["resumed_model_id"] = resumed.model_id
    out["resumed_forward_loss"] = (
        resumed.forward(data, "cross_entropy").result().metrics["loss:sum"]
    )
    # One more step on each: the same update only if Adam's moments and step count
    # came back with the weights.
    out["next_step_losses"] = [_step_then_loss(c, data) for c in (client, resumed)]

    # The checkpoint's facts, and a copy in another run that a new model starts from.
    base_url, api_key = trainer_address()
    rest = tinker.RestClient(base_url=base_url, api_key=api_key)
    out["weights_info"] = (
        rest.get_weights_info_by_tinker_path(out["save_path"]).result().model_dump()
    )
    out["copied_path"] = rest.copy_weights(out["save_path"], "proj-archive").result()
    from_copy = service.create_training_client_from_state(out["copied_path"]).result()
    out["from_copy_loss"] = from_copy.forward(data, "cross_entropy").result().metrics["loss:sum"]

    # tinker's default overwrite=False: the name exists, so the save fails...
    try:
        client.save_state("step-2").result()
        out["resave_error"] = None
    except Exception as exc:  # reported to the parent, which checks it
        out["resave_error"] = f"{type(exc).__name__}: {exc}"
    # ...and overwrite=True replaces it with the current state.
    out["overwrite_path"] = client.save_state("step-2", overwrite=True).result().path
    replaced = service.create_training_client_from_state(out["overwrite_path"]).result()
    out["replaced_forward_loss"] = (
        replaced.forward(data, "cross_entropy").result().metrics["loss:sum"]
    )
    out["current_forward_loss"] = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    return out


def _step_then_loss(client: tinker.TrainingClient, data: list[types.Datum]) -> float:
    fb = client.forward_backward(data, "cross_entropy")
    opt = client.optim_step(ADAM)
    fb.result()
    opt.result()
    loss: float = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    return loss


def sampling_flow(
    service: tinker.ServiceClient, base_model: str, prompt: list[int], vocab: int
) -> dict[str, Any]:
    """A training client's weights, sampled through the ``SamplingClient`` flows."""
    out: dict[str, Any] = {}
    client = service.create_lora_training_client(base_model=base_model, rank=4).result()
    client.forward_backward([datum(prompt)], "cross_entropy").result()
    client.optim_step(ADAM).result()

    sampler = client.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    response = sampler.sample(types.ModelInput.from_ints(prompt), 3, params).result()
    out["samples"] = [
        {"tokens": s.tokens, "logprobs": s.logprobs, "sequence_id": s.sequence_id}
        for s in response.sequences
    ]
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    out["prompt_logprobs"] = [None if v is None or math.isnan(v) else v for v in logprobs]
    last_two = sampler.compute_logprobs(
        types.ModelInput.from_ints(prompt), prompt_logprobs_last_n=2
    ).result()
    out["last_two_logprobs"] = [None if v is None or math.isnan(v) else v for v in last_two]

    # A named export, loaded back by the path it was given (the base model comes from
    # the trainer: samplers/{id}).
    path = client.save_weights_for_sampler("exported").result().path
    out["sampler_path"] = path
    named = client.create_sampling_client(path).result()
    out["named_base_model"] = named.get_base_model()
    again = named.sample(types.ModelInput.from_ints(prompt), 1, params).result()
    out["named_sample"] = again.sequences[0].tokens
    out["scores"] = scores_flow(client, sampler, prompt, vocab)
    out["sampler_path_for_refusals"] = path
    return out


def scores_flow(
    client: tinker.TrainingClient, sampler: tinker.SamplingClient, prompt: list[int], vocab: int
) -> dict[str, Any]:
    """Top-k, target and alternative-token logprobs of the sampler, next to `forward`'s
    logprob of every id at every prompt position (the (N, K) target form)."""
    rows = len(prompt) - 1
    every_id = [list(range(vocab))] * rows
    datum_all = types.Datum(
        model_input=types.ModelInput.from_ints(prompt[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(
                data=[i for row in every_id for i in row], dtype="int64", shape=[rows, vocab]
            )
        },
    )
    forward = client.forward([datum_all], "cross_entropy").result()
    dense = [[prompt[i + 1], -1] for i in range(rows)]
    dense[-1][1] = 42
    model_input = types.ModelInput.from_ints(prompt)
    params = types.SamplingParams(max_tokens=4, seed=3, stop=[])
    res = sampler.sample(
        model_input,
        2,
        params,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        topk_sample_logprobs=2,
        target_prompt_logprobs=types.TensorData(
            data=[i for row in dense for i in row], dtype="int64", shape=[rows, 2]
        ),
        prompt_alt_tokens_k=2,
    ).result()
    assert res.target_prompt_logprobs is not None and res.prompt_alt_tokens is not None
    sparse_ask = types.TensorData(
        data=[prompt[2], 7],
        dtype="int64",
        shape=[rows, 3],
        sparse_crow_indices=[0, 0, 1] + [2] * (rows - 2),
        sparse_col_indices=[1, 2],
    )
    sparse = sampler.sample(model_input, 1, params, target_prompt_logprobs=sparse_ask).result()
    assert sparse.target_prompt_logprobs is not None
    return {
        "forward": forward.loss_fn_outputs[0]["logprobs"].tolist(),
        "dense_asked": dense,
        "topk_prompt": res.topk_prompt_logprobs,
        "topk_sampled": [s.topk_logprobs for s in res.sequences],
        "sampled": [s.tokens for s in res.sequences],
        "target": res.target_prompt_logprobs.tolist(),
        "target_shape": res.target_prompt_logprobs.shape,
        "alt_tokens": res.prompt_alt_tokens.tokens.tolist(),
        "alt_logprobs": res.prompt_alt_tokens.logprobs.tolist(),
        "sparse": {
            "crow": sparse.target_prompt_logprobs.sparse_crow_indices,
            "col": sparse.target_prompt_logprobs.sparse_col_indices,
            "data": np.asarray(sparse.target_prompt_logprobs.data).tolist(),
        },
    }


def refusal_flow(service: tinker.ServiceClient, path: str, prompt: list[int]) -> list[str]:
    """Sampling options the trainer refuses, and its messages (the SDK logs each
    refusal as an error, so this runs after its log was collected)."""
    sampler = service.create_sampling_client(model_path=path).result()
    model_input = types.ModelInput.from_ints(prompt)
    params = types.SamplingParams(max_tokens=1)
    refused = []
    for options in (
        {"topk_prompt_logprobs": 5000},
        {"target_prompt_logprobs": types.TensorData(data=[1], dtype="int64", shape=[1, 1])},
    ):
        try:
            sampler.sample(model_input, 1, params, **options).result()
            refused.append("")
        except tinker.TinkerError as exc:
            refused.append(str(exc))
    return refused


def sft_flow(
    service: tinker.ServiceClient, base_model: str, examples: list[list[list[Any]]]
) -> dict[str, Any]:
    """A tinker-cookbook-style SFT loop, pipelined: each step is submitted before the
    previous step's results are read. Returns the mean loss per weighted token."""
    client = service.create_lora_training_client(base_model=base_model, rank=16).result()
    batch = [datum(tokens, weights) for tokens, weights in examples]
    weighted = sum(sum(weights[1:]) for _tokens, weights in examples)
    adam = types.AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    losses: list[float] = []
    pending = None
    for _step in range(12):
        fb = client.forward_backward(batch, "cross_entropy")
        opt = client.optim_step(adam)
        if pending is not None:
            losses.append(pending[0].result().metrics["loss:sum"] / weighted)
            pending[1].result()
        pending = (fb, opt)
    assert pending is not None
    losses.append(pending[0].result().metrics["loss:sum"] / weighted)
    pending[1].result()
    return {"losses": losses}


def gspo_flow(service: tinker.ServiceClient, base_model: str, prompt: list[int]) -> dict[str, Any]:
    """``gspo`` as tinker-cookbook's ``rl_loop.py`` sends it: one sampled sequence, its
    sampler logprobs, advantages on the sampled tokens, and a ``sequence_ratio_mask`` of
    0 on the prompt and 1 on the sampled tokens (plain lists: tinker's dtype table)."""
    client = service.create_lora_training_client(base_model=base_model, rank=4).result()
    sampler = client.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=4, seed=3)
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    pad = len(prompt) - 1
    inputs: dict[str, Any] = {
        "target_tokens": [0] * pad + seq.tokens,
        "logprobs": [0.0] * pad + seq.logprobs,
        "advantages": [0.0] * pad + [0.5] * len(seq.tokens),
    }
    model_input = types.ModelInput.from_ints(prompt + seq.tokens[:-1])
    masked = types.Datum(
        model_input=model_input,
        loss_fn_inputs={**inputs, "sequence_ratio_mask": [0.0] * pad + [1.0] * len(seq.tokens)},
    )
    bare = types.Datum(model_input=model_input, loss_fn_inputs=inputs)
    out: dict[str, Any] = {"sampled": len(seq.tokens)}
    out["loss"] = client.forward([masked], "gspo").result().metrics["loss:sum"]
    out["loss_without_mask"] = client.forward([bare], "gspo").result().metrics["loss:sum"]
    fb = client.forward_backward([masked], "gspo")
    opt = client.optim_step(ADAM)
    out["trained_loss"] = fb.result().metrics["loss:sum"]
    out["optim_steps"] = opt.result().metrics["optim_step:max"]
    return out


def main() -> int:
    collect = SdkProblems("tinker").install()
    base_url, api_key = trainer_address()
    given = json.load(sys.stdin)
    summary: dict[str, Any] = {}
    with tinker.ServiceClient(base_url=base_url, api_key=api_key) as service:
        base_model = given["base_model"]
        summary["training"] = training_flow(service, base_model)
        summary["sampling"] = sampling_flow(service, base_model, given["prompt"], given["vocab"])
        summary["sft"] = sft_flow(service, base_model, given["sft"])
        summary["gspo"] = gspo_flow(service, base_model, given["prompt"])
        summary["sdk_problems"] = list(collect.problems)
        summary["refused"] = refusal_flow(
            service, summary["sampling"]["sampler_path_for_refusals"], given["prompt"]
        )
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
