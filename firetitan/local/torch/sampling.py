"""Token generation with a KV cache, all ``num_samples`` sequences in one batch.

The prompt is the same for every sequence, so the batch never needs padding: one
prefill of shape (n, len(prompt)), then one decode step of shape (n, 1) per new token.
Sequences that have stopped keep stepping (their extra tokens are dropped) until all
have stopped or ``max_tokens`` is reached; that keeps the cache rectangular.

Per-token log-probabilities are the model's own: ``log_softmax`` in float32 of the
unmodified logits, whatever ``temperature``, ``top_k`` and ``top_p`` do to the choice.
They therefore equal what `forward` computes for the same tokens, which is what an RL
loss needs as ``logprobs`` when sampling at temperature 1.

The extra results a request may ask for (top-k prompt and sampled logprobs, the
logprobs of requested prompt ids, alternative prompt tokens) come from the same prefill
and decode steps and are laid out by `firetitan.local.sample_scores`. Alternative
tokens are drawn after the decode loop, so asking for them leaves a seeded sample's
tokens unchanged.

Stopping, as tinker's ``SamplingParams`` documents it: only ``stop=[]`` turns the
tokenizer's end-of-sequence token off (and then nothing stops early); ``None`` and every
non-empty ``stop`` keep it. Token ids stop when generated; strings stop once the decoded
text of the generated tokens contains them. The token that completes a stop is kept in the output
and the reason is ``"stop"``; running out of ``max_tokens`` (or of context) gives
``"length"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import tinker
import torch
from torch import nn

from firetitan.local import sample_scores
from firetitan.local.engine import DEFAULT_MAX_TOKENS, SamplingRequest
from firetitan.local.torch.models import cache_keyword
from firetitan.local.torch.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "SamplingPlan",
    "cache_of",
    "generate",
    "has_stop",
    "plan_sampling",
    "sampling_logits",
    "stop_window",
]


@attrs.frozen(kw_only=True)
class SamplingPlan:
    """Validated sampling parameters."""

    max_new: int
    temperature: float
    top_k: int  # 0: no limit
    top_p: float
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    seed: int | None


def plan_sampling(
    prompt: Sequence[int],
    params: tinker.SamplingParams,
    *,
    tokenizer: Tokenizer,
    context: int,
) -> SamplingPlan:
    """The generation plan of checked sampling parameters (`rules.check_sampling`):
    ``max_tokens`` capped by the context, stop ids and strings, the default stop."""
    wanted = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    room = context - len(prompt)
    stop_ids: set[int] = set()
    stop_strings: list[str] = []
    stop = params.stop
    keeps_eos = stop is None or isinstance(stop, str) or len(stop) > 0
    if keeps_eos and tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    if stop is not None:
        for item in [stop] if isinstance(stop, str) else list(stop):
            if isinstance(item, str):
                stop_strings.append(item)
            elif isinstance(item, int):
                stop_ids.add(item)
    return SamplingPlan(
        max_new=min(wanted, room),
        temperature=float(params.temperature),
        top_k=max(int(params.top_k), 0),
        top_p=float(params.top_p),
        stop_ids=frozenset(stop_ids),
        stop_strings=tuple(stop_strings),
        seed=params.seed,
    )


def sampling_logits(logits: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """The (B, V) logits of the distribution that ``plan`` samples from (temperature,
    then top-k, then top-p; excluded tokens at -inf). Needs ``plan.temperature > 0``."""
    scaled = logits / plan.temperature
    if 0 < plan.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, plan.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if plan.top_p < 1:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token always stays. The prefix sum runs on the CPU: CUDA's
        # floating-point cumsum is nondeterministic (and refused in deterministic mode).
        mass_above = torch.cumsum(probs.cpu(), dim=-1).to(probs.device) - probs
        drop_sorted = mass_above >= plan.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -math.inf)
    return scaled


def _choose(logits: torch.Tensor, plan: SamplingPlan, generator: torch.Generator) -> torch.Tensor:
    """Pick one token per row of (B, V) float32 logits."""
    if plan.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(sampling_logits(logits, plan), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    module: nn.Module,
    request: SamplingRequest,
    plan: SamplingPlan,
    *,
    generator: torch.Generator,
    tokenizer: Tokenizer,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[object],
    id_prefix: str,
) -> tinker.SampleResponse:
    """Run the decode loop described in the module docstring."""
    n, prompt, k_sample = request.num_samples, request.prompt, request.topk_sample_logprobs
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    top_ids: list[list[list[int]]] = [[] for _ in range(n)]
    top_lps: list[list[list[float]]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    window = stop_window(plan)
    keyword = cache_keyword(module)

    ids = torch.tensor([list(prompt)] * n, dtype=torch.int64, device=device)
    with torch.inference_mode(), autocast:
        out = module(input_ids=ids, use_cache=True)
        prompt_logits = out.logits[0, :-1]  # row i predicts prompt token i + 1
        logits = out.logits[:, -1, :].float()
        cache = cache_of(out)
        for step in range(plan.max_new):
            choice = _choose(logits, plan, generator)
            step_lp = torch.log_softmax(logits, dim=-1)
            lp = step_lp.gather(-1, choice[:, None]).squeeze(-1)
            best = step_lp.topk(k_sample, dim=-1) if k_sample else None
            for i, (tok, val) in enumerate(zip(choice.tolist(), lp.tolist(), strict=True)):
                if reasons[i] is not None:
                    continue
                tokens[i].append(tok)
                logprobs[i].append(val)
                if best is not None:
                    top_ids[i].append(best.indices[i].tolist())
                    top_lps[i].append(best.values[i].tolist())
                if tok in plan.stop_ids or (
                    plan.stop_strings
                    and has_stop(tokenizer.decode(tokens[i][-window:]), plan.stop_strings)
                ):
                    reasons[i] = "stop"
            if all(r is not None for r in reasons) or step == plan.max_new - 1:
                break
            out = module(input_ids=choice[:, None], use_cache=True, **{keyword: cache})
            logits = out.logits[:, -1, :].float()
            cache = cache_of(out)
        scores = _prompt_scores(prompt_logits, ids[0, 1:], request, plan, generator)

    sequences = [
        tinker.SampledSequence(
            stop_reason="stop" if reasons[i] == "stop" else "length",
            sequence_id=f"{id_prefix}-{i}",
            tokens_np=np.asarray(tokens[i], dtype=np.int32),
            logprobs_np=np.asarray(logprobs[i], dtype=np.float32),
            topk_logprobs_np=sample_scores.topk(
                np.reshape(top_ids[i], (-1, k_sample)), np.reshape(top_lps[i], (-1, k_sample))
            )
            if k_sample
            else None,
        )
        for i in range(n)
    ]
    return tinker.SampleResponse(sequences=sequences, **scores)


def _prompt_scores(
    logits: torch.Tensor,
    following: torch.Tensor,
    request: SamplingRequest,
    plan: SamplingPlan,
    generator: torch.Generator,
) -> dict[str, Any]:
    """The prompt's result fields the request asks for, as `tinker.SampleResponse`
    keywords, from the (len(prompt) - 1, V) logits that predict ``following``."""
    fields: dict[str, Any] = {}
    asked = (
        request.prompt_logprobs
        or request.topk_prompt_logprobs
        or request.target_prompt_logprobs is not None
        or request.prompt_alt_tokens_k
    )
    if not asked:
        return fields
    logits = logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    if request.prompt_logprobs:
        scored = np.full(len(request.prompt), np.nan, dtype=np.float32)
        scored[1:] = lp.gather(-1, following[:, None]).squeeze(-1).cpu().numpy()
        fields["prompt_logprobs_np"] = scored
    if request.topk_prompt_logprobs:
        best = lp.topk(request.topk_prompt_logprobs, dim=-1)
        fields["topk_prompt_logprobs_np"] = sample_scores.prompt_topk(
            best.indices.cpu().numpy(), best.values.cpu().numpy()
        )
    targets = request.target_prompt_logprobs
    if targets is not None:
        index = torch.as_tensor(targets, device=lp.device).clamp(min=0)
        scored_ids = lp.gather(-1, index).cpu().numpy()
        fields["target_prompt_logprobs"] = sample_scores.target_logprobs(targets, scored_ids)
    k = request.prompt_alt_tokens_k
    if k:
        if plan.temperature == 0:
            draws = logits.argmax(dim=-1, keepdim=True).expand(-1, k)
        else:
            probs = torch.softmax(logits / plan.temperature, dim=-1)
            draws = torch.multinomial(probs, k, replacement=True, generator=generator)
        fields["prompt_alt_tokens"] = sample_scores.alt_tokens(
            draws.cpu().numpy(), lp.gather(-1, draws).cpu().numpy()
        )
    return fields


def stop_window(plan: SamplingPlan) -> int:
    """How many trailing tokens to decode to see any stop string completed (a token
    decodes to at least a quarter of a character)."""
    return 4 * max((len(s) for s in plan.stop_strings), default=0) + 4


def has_stop(text: str, stops: Sequence[str]) -> bool:
    """Whether ``text`` contains one of the stop strings."""
    return any(s in text for s in stops)


def cache_of(out: object) -> object:
    """The KV cache of a model output."""
    # transformers 5 returns the KV cache as ``cache``; earlier releases as
    # ``past_key_values``.
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
