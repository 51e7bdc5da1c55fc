"""The completions endpoint (``endpoints.COMPLETIONS``): the request as the deployment
reads it, and the chunks and bodies it answers with (deployment.md §5).

Prompts are token ids. Every float field accepts JSON integers (tinker's defaults arrive
as ``1``); ``top_k: 0`` means no limit; ``stop`` is a string (one stop, never split into
characters) or a list of strings and token ids. Unknown keys are refused with the
"Extra inputs are not permitted" 400 that the Fireworks SDK recognises (its R3 probe
relies on it). ``n`` samples with a ``seed`` get seeds ``seed, seed+1, ...``: one seed
for all of them would make them identical.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import tinker

from firetitan.local.deployment.batching import Finish, PromptRows, Token, TopLogprobs
from firetitan.local.torch.tokenizer import Tokenizer

__all__ = [
    "CompletionRequest",
    "RequestError",
    "Rows",
    "TokenText",
    "envelope",
    "parse_completion_request",
]

#: Most samples one request may ask for (``n``).
MAX_N = 128
#: Most ``top_logprobs`` per token.
MAX_TOP_LOGPROBS = 20

_KNOWN = frozenset(
    {
        "model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "seed",
        "logprobs", "top_logprobs", "echo", "stop", "stream", "raw_output",
        "perf_metrics_in_response", "prompt_cache_key", "user",
    }
)  # fmt: skip


class RequestError(ValueError):
    """A completions request that cannot be served as sent (HTTP 400)."""


@attrs.frozen(kw_only=True)
class CompletionRequest:
    """A validated completions request."""

    model: str
    prompt: list[int]
    n: int
    params: tinker.SamplingParams
    logprobs: bool
    top_logprobs: int
    echo: bool
    stream: bool
    raw_output: bool
    perf_metrics: bool

    def sample_params(self, index: int) -> tinker.SamplingParams:
        """The sampling parameters of sample ``index`` (distinct seeds when seeded)."""
        if self.params.seed is None or index == 0:
            return self.params
        return self.params.model_copy(update={"seed": self.params.seed + index})


def parse_completion_request(body: object) -> CompletionRequest:
    """Check a completions body.

    Raises:
        RequestError: The first problem found, naming the field.
    """
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    for key in body:
        if key not in _KNOWN:
            raise RequestError(f"Extra inputs are not permitted, field: {key!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: required, the deployment name accounts/<a>/deployments/<d>")
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or not prompt or not all(_is_int(t) for t in prompt):
        raise RequestError("prompt: must be a non-empty list of token ids")
    logprobs = body.get("logprobs", False)
    top = _int(body, "top_logprobs", 0)
    if _is_int(logprobs):  # the legacy OpenAI form: a top-N count
        top, logprobs = max(top, int(logprobs)), True
    elif not isinstance(logprobs, bool):
        raise RequestError("logprobs: must be a boolean or an integer")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise RequestError(f"n: must be in [1, {MAX_N}], got {n}")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 0):
        raise RequestError(f"max_tokens: must be a non-negative integer, got {max_tokens!r}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"seed: must be an integer, got {seed!r}")
    params = tinker.SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0),
        seed=seed,
        stop=_stop(body.get("stop")),
    )
    return CompletionRequest(
        model=model,
        prompt=[int(t) for t in prompt],
        n=n,
        params=params,
        logprobs=bool(logprobs or top),
        top_logprobs=top,
        echo=_bool(body, "echo"),
        stream=_bool(body, "stream"),
        raw_output=_bool(body, "raw_output"),
        perf_metrics=_bool(body, "perf_metrics_in_response"),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(f"{key}: must be an integer, got {value!r}")
    return int(value)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{key}: must be a number, got {value!r}")
    return float(value)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{key}: must be a boolean, got {value!r}")
    return value


def _stop(value: object) -> str | list[str] | list[int] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and (
        all(isinstance(v, str) for v in value) or all(_is_int(v) for v in value)
    ):
        return value
    raise RequestError("stop: must be a string, a list of strings or a list of token ids")


class TokenText:
    """The text of token ids, single tokens cached (every streamed token needs its own)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.piece: Callable[[int], str] = functools.lru_cache(maxsize=1 << 16)(
            lambda token_id: tokenizer.decode([token_id])
        )

    def text(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids)


class Rows:
    """Renders one sample's events as completion choices."""

    def __init__(self, index: int, request: CompletionRequest, text: TokenText) -> None:
        self.index = index
        self._req = request
        self._tok = text
        self.tokens: list[int] = []
        self.content: list[dict[str, Any]] = []
        self.text: list[str] = []

    def prompt(self, rows: PromptRows) -> dict[str, Any]:
        """The choice that echoes the prompt (raw logprobs; the first one is 0.0)."""
        entries = []
        for i, token_id in enumerate(self._req.prompt):
            value = rows.logprobs[i]
            top = rows.top[i] if rows.top is not None else None
            entries.append(self._entry(token_id, 0.0 if math.isnan(value) else value, None, top))
        text = self._tok.text(self._req.prompt)
        return self._choice(text, entries)

    def token(self, token: Token) -> dict[str, Any]:
        """The choice that carries one generated token."""
        return self.tokens_choice([token])

    def tokens_choice(self, tokens: Sequence[Token]) -> dict[str, Any]:
        """The choice that carries consecutive generated tokens."""
        self.tokens.extend(t.token_id for t in tokens)
        entries = [self._entry(t.token_id, t.logprob, t.sampling_logprob, t.top) for t in tokens]
        return self._choice("".join(self._tok.piece(t.token_id) for t in tokens), entries)

    def final(self, finish: Finish) -> dict[str, Any]:
        """The last choice: finish reason and every id in ``raw_output``."""
        choice: dict[str, Any] = {"index": self.index, "text": "", "finish_reason": finish.reason}
        if self._req.raw_output:
            completion = (self._req.prompt if self._req.echo else []) + self.tokens
            choice["raw_output"] = {
                "prompt_token_ids": self._req.prompt,
                "completion_token_ids": completion,
            }
        return choice

    def whole(self, finish: Finish) -> dict[str, Any]:
        """The complete choice of a non-streaming answer."""
        choice = self.final(finish)
        choice["text"] = "".join(self.text)
        if self._req.logprobs:
            choice["logprobs"] = {"content": self.content}
        return choice

    def _choice(self, text: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.text.append(text)
        choice: dict[str, Any] = {"index": self.index, "text": text, "finish_reason": None}
        if self._req.logprobs:
            self.content.extend(entries)
            choice["logprobs"] = {"content": entries}
        return choice

    def _entry(
        self, token_id: int, logprob: float, sampling: float | None, top: TopLogprobs | None
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "token": self._tok.piece(token_id),
            "token_id": token_id,
            "logprob": logprob,
            "sampling_logprob": sampling,
        }
        if top is not None:
            entry["top_logprobs"] = [
                {"token": self._tok.piece(i), "token_id": i, "logprob": v} for i, v in top
            ]
        return entry


def envelope(
    completion_id: str, model: str, choices: Sequence[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """A completion object (one SSE chunk, or the whole non-streaming answer)."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": list(choices),
        **extra,
    }
