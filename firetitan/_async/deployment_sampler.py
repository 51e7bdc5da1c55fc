"""`AsyncDeploymentSampler`: token ids in, token ids and logprobs out, from a deployment.

Each sample is one streamed ``n: 1`` completion (deployment.md §5) with its own
``x-request-id``, kept across that sample's retries so the deployment can tell a retry
from a new request. Where the reference client differs, on purpose:

* ``num_samples`` requests get **distinct seeds** (``seed``, ``seed + 1``, ...), so a
  seeded group is still a group of different samples;
* a ``stop`` given as one string is one stop string, never its characters;
* stop token ids become stop strings through the tokenizer; the end-of-sequence id is
  left to the deployment, which ends a completion there by itself;
* retries, the concurrency limit and its back-off live in the transport
  (`Transport.stream`); here is only what a completion means.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import tinker

from firetitan import _wire
from firetitan._async._checks import positive_int
from firetitan._async.deployment import AsyncDeployment

__all__ = ["AsyncDeploymentSampler", "stop_strings"]

#: tinker's default when ``SamplingParams.max_tokens`` is None.
DEFAULT_MAX_TOKENS = 1024


class AsyncDeploymentSampler:
    """Samples completions of token-id prompts from a hot-load deployment.

    Args:
        deployment: The deployment (its connections and concurrency limit are shared
            by every sampler on it).
        tokenizer: Needed only for stop token ids (any object with ``decode`` and
            ``eos_token_id``).
    """

    def __init__(self, deployment: AsyncDeployment, *, tokenizer: Any = None) -> None:
        self._deployment = deployment
        self._tokenizer = tokenizer

    @property
    def deployment(self) -> AsyncDeployment:
        """The deployment sampled from."""
        return self._deployment

    def __repr__(self) -> str:
        return f"<AsyncDeploymentSampler on {self._deployment!r}>"

    async def sample_tokens(
        self,
        prompt: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | Sequence[int] | None = None,
        prompt_logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> list[_wire.Completion]:
        """Sample ``num_samples`` completions of ``prompt``, concurrently.

        Args:
            prompt: The prompt's token ids, sent as they are (no BOS, no template).
            num_samples: Completions to sample; each is its own request.
            max_tokens: Most tokens per completion.
            temperature: Sampling temperature.
            top_p: Nucleus mass (1: all).
            top_k: Most likely tokens to sample among (0: all).
            seed: Seed of the first completion; completion ``i`` uses ``seed + i``.
                None lets the deployment choose.
            stop: A stop string, a list of them, or a list of token ids.
            prompt_logprobs: Also return the logprob of each prompt token.
            top_logprobs: With ``prompt_logprobs``: also the most likely tokens at each
                prompt position, this many.

        Returns:
            One `Completion` per sample: tokens, their behaviour-policy logprobs, the
            finish reason (and prompt logprobs when asked).

        Raises:
            ValueError: Invalid arguments, or stop token ids without a tokenizer.
            APIError: A completion failed after its retries.
        """
        positive_int(num_samples, "num_samples")
        positive_int(max_tokens, "max_tokens")
        positive_int(top_k, "top_k", zero=True)
        positive_int(top_logprobs, "top_logprobs", zero=True)
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt must hold at least one token")
        stops = stop_strings(stop, self._tokenizer)
        model = await self._deployment.model()
        full = float(temperature) == 1.0 and float(top_p) == 1.0 and top_k == 0
        bodies = [
            _wire.completion_body(
                model,
                tokens,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=None if seed is None else seed + i,
                stop=stops,
                top_logprobs=top_logprobs if prompt_logprobs else 0,
                echo=prompt_logprobs,
            )
            for i in range(num_samples)
        ]

        def fold() -> _wire.CompletionStream:
            return _wire.CompletionStream(tokens, echo=prompt_logprobs, full_distribution=full)

        complete = self._deployment._complete
        return list(await asyncio.gather(*(complete(body, fold) for body in bodies)))

    async def _sample(self, request: _wire.SampleRequest) -> tinker.SampleResponse:
        """`sample_tokens` for what a sampling client would send a trainer, answered
        with tinker's types. Only its prompt, count, sampling parameters and prompt
        logprobs are served here; the sampling client refuses the trainer's other
        options before it calls."""
        p = request.sampling_params
        topk = request.topk_prompt_logprobs
        completions = await self.sample_tokens(
            request.prompt.to_ints(),
            num_samples=request.num_samples,
            max_tokens=DEFAULT_MAX_TOKENS if p.max_tokens is None else p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=max(p.top_k, 0),  # tinker's -1 means no limit, as 0 does here
            seed=p.seed,
            stop=p.stop,
            prompt_logprobs=request.prompt_logprobs or topk > 0,
            top_logprobs=topk,
        )
        last = completions[-1]
        return tinker.SampleResponse(
            sequences=[
                tinker.SampledSequence(
                    stop_reason="length" if c.finish_reason == "length" else "stop",
                    sequence_id=f"{i}",
                    _tokens_list=c.tokens,
                    _logprobs_list=c.logprobs,
                )
                for i, c in enumerate(completions)
            ],
            _prompt_logprobs_list=last.prompt_logprobs,
            _topk_prompt_logprobs_list=last.prompt_top_logprobs if topk else None,
        )


def stop_strings(stop: str | Sequence[str] | Sequence[int] | None, tokenizer: Any) -> list[str]:
    """The ``stop`` list a completions request carries.

    A string is one stop (never split into characters); token ids are decoded one by
    one with ``tokenizer``; the tokenizer's end-of-sequence id is dropped, because a
    deployment ends a completion there anyway and its text is often empty.

    Raises:
        ValueError: Token ids without a tokenizer, an id whose text is empty, or a
            mixed or empty-string list.
    """
    if stop is None:
        return []
    if isinstance(stop, str):
        items: list[Any] = [stop]
    else:
        items = list(stop)
    if all(isinstance(s, str) for s in items):
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return items
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in items):
        raise ValueError("stop must be a string, a list of strings or a list of token ids")
    if tokenizer is None:
        raise ValueError(
            "stop token ids need a tokenizer to become stop strings: configure one "
            "(DeploymentConfig(tokenizer=...)) or give stop strings"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for token in items:
        if token == eos:
            continue
        text = tokenizer.decode([token], skip_special_tokens=False)
        if not text:
            raise ValueError(f"stop token id {token} has no text in the tokenizer")
        out.append(text)
    return out
