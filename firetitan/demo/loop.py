"""SFT warm-up, then GRPO-style RL, driven through the public async SDK only.

The calls, in order:

1. ``create_training_client`` (full parameters), then a warm-up on the noisy corpus with
   ``cross_entropy``: each step's ``forward_backward`` + ``optim_step`` is submitted
   before the previous step's results are read, so the trainer never waits for us.
2. ``save_state("sft-warmup")``; a second session creates the *reference* model and
   ``load_state``s that checkpoint. It is never stepped, so it stays the warmed-up
   policy that the KL penalty measures drift from (the usual RLHF reference).
3. Per RL step: one ``sample`` request per prompt, all in flight at once, from the
   latest sampler export; binary rewards; advantages relative to the prompt's group;
   reference logprobs via ``forward``; the KL penalty folded into the per-token
   advantages; the ``ppo`` loss over ``substeps`` slices of the batch, every
   ``forward_backward``/``optim_step`` pair and the next sampler export submitted back
   to back (call order is execution order on the trainer), then awaited together.
4. Sampler exports: ``save_weights_for_sampler_ext`` with ``base`` first and ``delta``
   after (a fresh ``base`` every ``rebase_every`` exports).
5. Midway, a resume drill: ``save_state``, a new session and training client,
   ``load_state_with_optimizer``, and a check that the restored model computes the
   same logprobs as the one it replaces; training continues on the restored client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import tinker

from firetitan import (
    AsyncAPIFuture,
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    AsyncSamplingClient,
    DeploymentConfig,
    GradAccNormalization,
)
from firetitan.demo import task
from firetitan.demo.config import DemoConfig

__all__ = ["DemoError", "ResumeDrill", "StepSink", "TrainingOutcome", "train"]

#: Receives one metrics row per step, as soon as the step is done.
StepSink = Callable[[dict[str, Any]], None]

_METADATA = {"run": "firetitan-demo"}
#: Bounds of the PPO ratio exp(lp - q) (spec/losses.md: bounds on the ratio itself).
_PPO_CONFIG = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


class DemoError(Exception):
    """The trainer cannot run the demo (e.g. its model uses another vocabulary)."""


@attrs.frozen
class ResumeDrill:
    """What the resume drill did.

    Attributes:
        step: The RL step before which it ran.
        checkpoint: The ``save_state`` path that was restored.
        max_abs_logprob_diff: Largest difference between the logprobs of the model
            before the drill and of the restored one (0.0: bit-identical).
    """

    step: int
    checkpoint: str
    max_abs_logprob_diff: float


@attrs.frozen
class TrainingOutcome:
    """Where things ended up.

    Attributes:
        final_sampler_path: The last sampler export (the trained policy).
        resume: The resume drill's result.
        answers_before: The greedy answer to each prompt after the warm-up.
        answers_after: The greedy answer to each prompt after RL.
        rollouts_from: ``deployment <url>`` or ``trainer``.
    """

    final_sampler_path: str
    resume: ResumeDrill
    answers_before: dict[str, str]
    answers_after: dict[str, str]
    rollouts_from: str = "trainer"


@attrs.frozen
class _Rollout:
    digit: int
    tokens: list[int]
    logprobs: np.ndarray  # the sampler's, one per sampled token
    reward: float

    def datum_parts(self) -> tuple[tinker.ModelInput, np.ndarray, int]:
        """Model input, targets, and how many target positions belong to the prompt."""
        prompt = task.prompt_ids(self.digit)
        model_input, targets = task.shifted(prompt + self.tokens)
        return model_input, targets, len(prompt) - 1


class _Policy:
    """The policy's session, training client and sampler; the resume drill swaps in a
    new session and client."""

    def __init__(self, service: AsyncFiretitanServiceClient) -> None:
        self.service = service
        self._client: AsyncFiretitanTrainingClient | None = None
        self.exports = 0  # exports by this client: a delta needs one of its own before it
        self._sampler: AsyncSamplingClient | None = None

    @property
    def client(self) -> AsyncFiretitanTrainingClient:
        assert self._client is not None, "start() first"
        return self._client

    @property
    def sampler(self) -> AsyncSamplingClient:
        """A sampling client on the latest export."""
        assert self._sampler is not None, "publish first"
        return self._sampler

    async def start(self, base_model: str) -> AsyncFiretitanTrainingClient:
        self._client = await self.service.create_training_client(base_model, lora_rank=0)
        self.exports = 0
        return self._client

    async def publish(self, name: str, rebase_every: int) -> str:
        """Export the weights for sampling and point `sampler` at the export.

        Returns:
            The export's kind: ``base`` (full weights) or ``delta``.
        """
        kind = "base" if self.exports % rebase_every == 0 else "delta"
        deployment = self.service.deployment
        if kind == "delta" and deployment is not None:
            # A delta only if the deployment holds the export it applies to.
            kind = await self.client.next_checkpoint_type(deployment)
        saved = await self.client.save_weights_for_sampler_ext(name, checkpoint_type=kind)
        self.exports += 1
        # With a deployment this hot-loads the export into it (the delta naming the
        # export it applies to) and samples there; otherwise it samples on the trainer.
        self._sampler = await self.service.create_sampling_client(model_path=saved.path)
        return kind

    async def take_over(self, other: _Policy) -> None:
        """Continue with ``other``'s session and client; close this one's session."""
        old, self.service = self.service, other.service
        self._client, self.exports, self._sampler = other.client, other.exports, None
        await old.aclose()

    async def aclose(self) -> None:
        await self.service.aclose()


def _service(
    base_url: str, api_key: str | None, deployment: DeploymentConfig | None = None
) -> AsyncFiretitanServiceClient:
    return AsyncFiretitanServiceClient(
        base_url=base_url, api_key=api_key, user_metadata=_METADATA, deployment=deployment
    )


async def train(
    cfg: DemoConfig,
    base_url: str,
    api_key: str | None,
    sink: StepSink,
    deployment: DeploymentConfig | None = None,
) -> TrainingOutcome:
    """Run the warm-up and the RL loop against the trainer at ``base_url``, sampling
    rollouts from ``deployment`` (each export hot-loaded into it) when one is given.

    Raises:
        DemoError: The trainer's model does not use the byte-level vocabulary.
        FiretitanError: A request failed.
    """
    async with contextlib.AsyncExitStack() as stack:
        policy = _Policy(_service(base_url, api_key, deployment))
        stack.push_async_callback(policy.aclose)  # whichever session is current then
        client = await policy.start(cfg.base_model)
        await _check_vocabulary(client)
        await _warm_up(client, cfg, sink)
        warm = await client.save_state("sft-warmup")

        ref_service = await stack.enter_async_context(_service(base_url, api_key))
        reference = await ref_service.create_training_client(cfg.base_model, lora_rank=0)
        await reference.load_state(warm.path)

        await policy.publish("rl-000", cfg.rebase_every)
        before = await _greedy_answers(policy.sampler, cfg)
        drill: ResumeDrill | None = None
        for step in range(cfg.rl_steps):
            extra: dict[str, Any] = {}
            if step == cfg.rl_steps // 2:
                drill = await _resume_drill(policy, cfg, base_url, api_key, step, deployment)
                extra = {"resumed_from": drill.checkpoint}
            sink({**await _rl_step(policy, reference, cfg, step), **extra})
        assert drill is not None  # rl_steps >= 2, so the drill ran
        after = await _greedy_answers(policy.sampler, cfg)
        where = "trainer" if deployment is None else f"deployment {deployment.base_url}"
        outcome = TrainingOutcome(policy.sampler.model_path or "", drill, before, after, where)
    return outcome


async def _check_vocabulary(client: AsyncFiretitanTrainingClient) -> None:
    info = await client.get_info()
    tokenizer = info.model_data.tokenizer_id
    if tokenizer is not None and tokenizer != task.tokenizer().name:
        raise DemoError(
            f"the demo's task is written in the byte-level vocabulary "
            f"({task.tokenizer().name}); {client.base_model!r} uses {tokenizer!r}"
        )


# ---------------------------------------------------------------------------- warm-up


def _sft_batches(cfg: DemoConfig) -> list[list[task.Example]]:
    """Batches over the corpus, reshuffled every epoch (seeded)."""
    corpus = task.sft_corpus(cfg.corpus_size, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    stream: list[task.Example] = []
    while len(stream) < cfg.sft_steps * cfg.sft_batch:
        stream.extend(corpus[i] for i in rng.permutation(len(corpus)))
    return [stream[i * cfg.sft_batch : (i + 1) * cfg.sft_batch] for i in range(cfg.sft_steps)]


async def _warm_up(client: AsyncFiretitanTrainingClient, cfg: DemoConfig, sink: StepSink) -> None:
    adam = tinker.AdamParams(learning_rate=cfg.sft_learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    in_flight: collections.deque[tuple[int, int, int, AsyncAPIFuture[Any], AsyncAPIFuture[Any]]]
    in_flight = collections.deque()
    last = time.perf_counter()

    async def finish_oldest() -> None:
        nonlocal last
        step, answer_tokens, all_tokens, fb, opt = in_flight.popleft()
        out, _ = await fb, await opt
        now = time.perf_counter()
        # Losses are plain sums (spec/losses.md): divide by the answer tokens trained on.
        loss = out.metrics["loss:sum"] / answer_tokens
        rate = all_tokens / (now - last)  # every position goes through the model
        sink({"phase": "sft", "step": step, "loss": loss, "tokens_per_s": rate})
        last = now

    for step, batch in enumerate(_sft_batches(cfg)):
        data = [task.sft_datum(e) for e in batch]
        answer_tokens = sum(len(task.completion_ids(e.word)) for e in batch)
        all_tokens = sum(d.model_input.length for d in data)
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(adam, GradAccNormalization.NUM_LOSS_TOKENS)
        in_flight.append((step, answer_tokens, all_tokens, fb, opt))
        # One step stays queued on the trainer while we read the previous one.
        if len(in_flight) > 1:
            await finish_oldest()
    while in_flight:
        await finish_oldest()


# ---------------------------------------------------------------------------- RL


async def _rollouts(
    sampler: AsyncSamplingClient, cfg: DemoConfig, step: int
) -> list[list[_Rollout]]:
    """One group of ``group_size`` samples per digit, all requests in flight at once."""

    def request(digit: int) -> AsyncAPIFuture[tinker.SampleResponse]:
        params = tinker.SamplingParams(
            max_tokens=cfg.max_tokens,
            temperature=1.0,  # the sampler's logprobs are then the policy's own
            seed=cfg.seed * 1_000_003 + step * len(task.DIGITS) + digit,
        )
        prompt = tinker.ModelInput.from_ints(task.prompt_ids(digit))
        return sampler.sample(prompt, cfg.group_size, params)

    responses = await asyncio.gather(*(request(d) for d in task.DIGITS))
    groups = []
    for digit, response in zip(task.DIGITS, responses, strict=True):
        group = []
        for seq in response.sequences:
            if seq.logprobs is None or len(seq.logprobs) != len(seq.tokens):
                raise DemoError("the sampler did not return one logprob per sampled token")
            text = task.completion_text(seq.tokens)
            group.append(
                _Rollout(
                    digit,
                    list(seq.tokens),
                    np.asarray(seq.logprobs, dtype=np.float32),
                    task.reward(digit, text),
                )
            )
        groups.append(group)
    return groups


async def _greedy_answers(sampler: AsyncSamplingClient, cfg: DemoConfig) -> dict[str, str]:
    """The greedy (temperature 0) answer to every prompt, keyed by prompt text."""
    params = tinker.SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0)
    responses = await asyncio.gather(
        *(
            sampler.sample(tinker.ModelInput.from_ints(task.prompt_ids(d)), 1, params)
            for d in task.DIGITS
        )
    )
    return {
        task.prompt_text(d): task.completion_text(r.sequences[0].tokens)
        for d, r in zip(task.DIGITS, responses, strict=True)
    }


def _reference_datum(r: _Rollout) -> tinker.Datum:
    model_input, targets, _ = r.datum_parts()
    return tinker.Datum(
        model_input=model_input,
        loss_fn_inputs={"target_tokens": tinker.TensorData.from_numpy(targets)},
    )


def _ppo_datum(r: _Rollout, advantages: np.ndarray) -> tinker.Datum:
    """Prompt positions get advantage 0: they carry no gradient and count as no token."""
    model_input, targets, prompt_targets = r.datum_parts()
    pad = np.zeros(prompt_targets, dtype=np.float32)
    return tinker.Datum(
        model_input=model_input,
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(targets),
            "logprobs": tinker.TensorData.from_numpy(np.concatenate([pad, r.logprobs])),
            "advantages": tinker.TensorData.from_numpy(
                np.concatenate([pad, advantages]).astype(np.float32)
            ),
        },
    )


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    n = len(items)
    return [list(items[i * n // parts : (i + 1) * n // parts]) for i in range(parts)]


async def _rl_step(
    policy: _Policy, reference: AsyncFiretitanTrainingClient, cfg: DemoConfig, step: int
) -> dict[str, Any]:
    start = time.perf_counter()
    groups = await _rollouts(policy.sampler, cfg, step)
    sample_seconds = time.perf_counter() - start
    flat = [r for group in groups for r in group]
    tokens = sum(len(r.tokens) for r in flat)

    ref_out = await reference.forward([_reference_datum(r) for r in flat], "cross_entropy")
    # Per-token KL estimate log pi(x) - log pi_ref(x) at each sampled token x; as a
    # penalty in the advantage it is the score-function form of beta * KL(pi || pi_ref).
    kls = [
        r.logprobs.astype(np.float64) - out["logprobs"].to_numpy()[r.datum_parts()[2] :]
        for r, out in zip(flat, ref_out.loss_fn_outputs, strict=True)
    ]
    # GRPO: each rollout's baseline is the mean reward of its prompt's own group.
    baselines = [float(np.mean([r.reward for r in group])) for group in groups for _ in group]
    datums = [
        _ppo_datum(r, (r.reward - baseline) - cfg.kl_beta * kl)
        for r, baseline, kl in zip(flat, baselines, kls, strict=True)
    ]
    bounds = np.cumsum([0] + [len(group) for group in groups]).tolist()
    datums_by_group = [datums[a:b] for a, b in itertools.pairwise(bounds)]

    adam = tinker.AdamParams(
        learning_rate=cfg.rl_learning_rate, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip_norm=1.0
    )
    passes: list[tuple[AsyncAPIFuture[Any], AsyncAPIFuture[Any]]] = []
    for part in _split(datums_by_group, cfg.substeps):
        batch = [d for datums in part for d in datums]
        fb = policy.client.forward_backward(batch, "ppo", _PPO_CONFIG)
        opt = policy.client.optim_step(adam, GradAccNormalization.NUM_LOSS_TOKENS)
        passes.append((fb, opt))
    # Submitted behind the optimizer steps without waiting for them: the trainer runs
    # calls in submission order, so the export holds this step's final weights.
    export = asyncio.ensure_future(policy.publish(f"rl-{step + 1:03d}", cfg.rebase_every))
    # Retrieve its outcome even if we stop early, so no error is left unobserved.
    export.add_done_callback(lambda t: t.cancelled() or t.exception())
    loss_sum = 0.0
    try:
        for fb, opt in passes:
            out, _ = await fb, await opt
            loss_sum += out.metrics["loss:sum"]
        kind = await export
    except BaseException:
        export.cancel()
        raise

    rewards = [r.reward for r in flat]
    row = {
        "phase": "rl",
        "step": step,
        "reward_mean": float(np.mean(rewards)),
        "loss": loss_sum / tokens,
        "kl": float(sum(k.sum() for k in kls)) / tokens,
        "tokens_per_s": tokens / sample_seconds,
        "sampled_tokens": tokens,
        "export": kind,
        "seconds": time.perf_counter() - start,
    }
    return row


async def _resume_drill(
    policy: _Policy,
    cfg: DemoConfig,
    base_url: str,
    api_key: str | None,
    step: int,
    deployment: DeploymentConfig | None,
) -> ResumeDrill:
    """Checkpoint, then continue from the checkpoint in a new session, as a restarted
    training script would; the old session is closed."""
    saved = await policy.client.save_state(f"rl-step-{step:03d}")
    probe = [task.sft_datum(task.Example(d, task.WORDS[d])) for d in task.DIGITS]
    before = await policy.client.forward(probe, "cross_entropy")

    fresh = _Policy(_service(base_url, api_key, deployment))
    try:
        client = await fresh.start(cfg.base_model)
        await client.load_state_with_optimizer(saved.path)
        after = await client.forward(probe, "cross_entropy")
    except BaseException:
        await fresh.aclose()
        raise
    diff = max(
        float(np.max(np.abs(a["logprobs"].to_numpy() - b["logprobs"].to_numpy())))
        for a, b in zip(before.loss_fn_outputs, after.loss_fn_outputs, strict=True)
    )
    await policy.take_over(fresh)
    # The new client has no export of its own yet, so this one is a full base.
    await policy.publish(f"rl-{step:03d}-resumed", cfg.rebase_every)
    return ResumeDrill(step, saved.path, diff)
