"""GRPO on the async client, with a frozen reference model for a KL penalty.

The task is deliberately small: after a prompt such as ``"a:"`` the model should answer
in lowercase letters. The reward of an answer is the share of its characters that are
lowercase ASCII letters (an untrained stand-in scores about 0.1). Each step:

1. exports the policy's weights and samples a group of answers per prompt from the
   export, every request in flight at once (on the trainer, or with ``--deployment`` on
   an inference deployment that hot-loads each export: the first as full weights, the
   later ones as deltas);
2. scores them and computes group-relative advantages (reward minus the group's mean);
3. asks the frozen reference model (``create_base_training_client``) for its logprobs
   of the same answers, and subtracts ``KL_COEF * (sampler logprob - reference
   logprob)`` from every answer token's advantage;
4. trains with the built-in ``ppo`` loss (docs/losses.md: its inputs, which tokens
   count under ``NUM_LOSS_TOKENS``, its config keys); ``forward_backward`` and
   ``optim_step`` are sent back to back (call order is execution order) and awaited
   together.

Run it on the embedded trainer (torch engine, tiny stand-in of qwen3-8b, byte-level
tokenizer)::

    python examples/async_grpo.py                  # 30 steps
    python examples/async_grpo.py --quick          # 2 steps, what CI runs
    python examples/async_grpo.py --deployment     # sample on a local deployment

or on any trainer: ``--base-url URL --api-key KEY --base-model NAME`` (the task is
written in the stand-ins' byte-level vocabulary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator

import numpy as np
import tinker

from firetitan import (
    AsyncFiretitanServiceClient,
    ByteTokenizer,
    DeploymentConfig,
    GradAccNormalization,
)
from firetitan.local import LocalTrainer

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
PROMPTS = ["a:", "b:", "c:", "d:"]
ANSWER_TOKENS = 4
KL_COEF = 0.05
TOKENIZER = ByteTokenizer()


def reward(answer: str) -> float:
    """The share of the answer's characters that are lowercase ASCII letters, counted
    against the longest answer (so stopping early does not pay)."""
    return sum("a" <= c <= "z" for c in answer) / ANSWER_TOKENS


def rl_datum(prompt: list[int], answer: list[int], values: dict[str, list[float]]) -> tinker.Datum:
    """A next-token datum over prompt + answer whose per-token inputs (``logprobs``,
    ``advantages``) are 0 on the prompt: zero-advantage tokens carry no gradient and
    do not count as loss tokens."""
    tokens = prompt + answer
    pad = [0.0] * (len(prompt) - 1)
    inputs: dict[str, tinker.TensorData] = {
        "target_tokens": tinker.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64))
    }
    for key, per_answer_token in values.items():
        array = np.array(pad + per_answer_token, dtype=np.float32)
        inputs[key] = tinker.TensorData.from_numpy(array)
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


async def train(
    base_url: str,
    api_key: str | None,
    base_model: str,
    steps: int,
    group: int,
    deployment: DeploymentConfig | None = None,
) -> None:
    async with AsyncFiretitanServiceClient(
        base_url=base_url, api_key=api_key, deployment=deployment
    ) as service:
        policy = await service.create_training_client(base_model, lora_rank=0)
        reference = await service.create_base_training_client(base_model)  # never stepped
        adam = tinker.AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.95)
        params = tinker.SamplingParams(max_tokens=ANSWER_TOKENS, temperature=1.0)
        prompts = [TOKENIZER.encode(p) for p in PROMPTS]
        rewards: list[float] = []
        for step in range(steps):
            # Full-parameter exports: the first is "base", the later ones "delta". With a
            # deployment, each is hot-loaded there and the sampler samples from it.
            sampler = await policy.save_weights_and_get_sampling_client(f"grpo-{step}")
            if step == 0:
                on = "the deployment" if sampler.deployment_sampler else "the trainer"
                print(f"sampling on {on}")
            responses = await asyncio.gather(
                *(sampler.sample(tinker.ModelInput.from_ints(p), group, params) for p in prompts)
            )
            # One rollout per sampled answer: (prompt, answer tokens, logprobs, advantage).
            rollouts = []
            for prompt, response in zip(prompts, responses, strict=True):
                scores = [reward(TOKENIZER.decode(s.tokens)) for s in response.sequences]
                mean = statistics.fmean(scores)
                rewards.append(mean)
                for seq, score in zip(response.sequences, scores, strict=True):
                    assert seq.logprobs is not None
                    rollouts.append((prompt, list(seq.tokens), list(seq.logprobs), score - mean))

            ref_data = [rl_datum(p, a, {}) for p, a, _, _ in rollouts]
            ref_out = await reference.forward(ref_data, "cross_entropy")
            data = []
            for (prompt, answer, logprobs, advantage), ref in zip(
                rollouts, ref_out.loss_fn_outputs, strict=True
            ):
                ref_logprobs = ref["logprobs"].to_numpy()[len(prompt) - 1 :]
                kl = np.asarray(logprobs) - ref_logprobs
                advantages = (advantage - KL_COEF * kl).tolist()
                data.append(
                    rl_datum(prompt, answer, {"logprobs": logprobs, "advantages": advantages})
                )

            fb = policy.forward_backward(
                data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
            )
            opt = policy.optim_step(adam, GradAccNormalization.NUM_LOSS_TOKENS)
            out, _ = await fb, await opt
            step_reward = statistics.fmean(rewards[-len(prompts) :])
            loss = out.metrics["loss:sum"]
            print(f"step {step}: mean reward {step_reward:.2f}, loss:sum {loss:.3f}")

        window = max(1, min(5, steps // 2)) * len(prompts)
        print(
            f"mean reward: first steps {statistics.fmean(rewards[:window]):.2f}, "
            f"last steps {statistics.fmean(rewards[-window:]):.2f}"
        )


@contextlib.asynccontextmanager
async def trainer(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[str, str | None, DeploymentConfig | None]]:
    """The trainer to use (the one given on the command line, or an embedded one), and
    the deployment to sample on (None: sample on the trainer)."""
    if args.base_url:
        yield args.base_url, args.api_key, None
        return
    async with LocalTrainer(base_model=args.base_model, deployment=args.deployment) as local:
        deployment = None
        if args.deployment:
            deployment = DeploymentConfig(
                base_url=local.deployment.base_url,
                deployment_id=local.deployment.deployment_id,
                account=local.deployment.account,
            )
        yield local.base_url, local.api_key, deployment


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, small groups")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--base-url", help="a running trainer (default: an embedded one)")
    parser.add_argument("--api-key")
    parser.add_argument("--base-model", default=BASE_MODEL)
    parser.add_argument(
        "--deployment", action="store_true", help="sample on a local inference deployment"
    )
    args = parser.parse_args()
    steps, group = (2, 4) if args.quick else (args.steps, 8)
    async with trainer(args) as (base_url, api_key, deployment):
        await train(base_url, api_key, args.base_model, steps, group, deployment)


if __name__ == "__main__":
    asyncio.run(main())
