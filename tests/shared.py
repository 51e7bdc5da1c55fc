"""Constants and helpers every test directory shares (``from shared import ...``; the
SDK child processes of ``tests/compat`` import it the same way).

`connect` builds every async service client a test does not build on purpose, with
quick settings; `proxied` puts a `FaultProxy` in front. `Surface` runs one test body
through either client surface: the async core or the blocking facade. The design
promises that both behave alike wherever their behaviour is the same; tests written
against `Surface` check that promise on both. The builders at the end make data and
Hugging Face stand-ins for any SDK's types.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tinker
from faults import FaultPlan, FaultProxy

from firetitan import (
    APIFuture,
    AsyncFiretitanServiceClient,
    ClientConfig,
    FiretitanServiceClient,
    RetryPolicy,
    Timeouts,
    _wire,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from firetitan.local import LocalTrainer

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"

# Short sentences sharing words and structure, so a tiny model can learn them in a few
# hundred steps.
SFT_CORPUS = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a bird sang in the tree.",
    "the sun rose over the hill.",
    "we read books by the fire.",
    "rain fell on the old roof.",
]

# Quick waits, so retries and long-polls happen in milliseconds.
FAST_TRAINER: dict[str, Any] = {
    "long_poll_seconds": 1.0,
    "gap_wait_seconds": 20.0,
    "maintenance_interval_seconds": 0.05,
}
FAST_CLIENT = ClientConfig(
    timeouts=Timeouts(connect=2.0, request=10.0, long_poll_read=10.0),
    retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.2, deadline=30.0, max_retry_after=0.5),
    future_deadline=60.0,
    heartbeat_interval=0.2,
)


def connect(
    base_url: str, api_key: str, config: ClientConfig = FAST_CLIENT, **options: Any
) -> AsyncFiretitanServiceClient:
    """An async service client with the tests' quick settings (``async with`` it);
    ``options`` are the client's other keyword arguments (``tokenizer``, ...)."""
    return AsyncFiretitanServiceClient(base_url=base_url, api_key=api_key, config=config, **options)


@contextlib.asynccontextmanager
async def proxied(
    trainer: LocalTrainer,
    plan: FaultPlan | None = None,
    config: ClientConfig = FAST_CLIENT,
    **options: Any,
) -> AsyncIterator[tuple[FaultProxy, AsyncFiretitanServiceClient]]:
    """A `FaultProxy` in front of ``trainer`` and an async service client connected
    through it, both closed on exit."""
    async with (
        FaultProxy(trainer.base_url, plan) as proxy,
        connect(proxy.base_url, trainer.api_key, config, **options) as service,
    ):
        yield proxy, service


class Surface:
    """One client surface, driven from an async test.

    ``await surface.call(obj.method, *args)`` calls a client method and waits for its
    outcome: on the async surface it awaits the coroutine or future; on the facade it
    calls the blocking method off the event loop (as a sync program would, from a
    thread) and waits for an `APIFuture` with ``result()``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @contextlib.asynccontextmanager
    async def service(self, base_url: str, api_key: str) -> AsyncIterator[Any]:
        """A service client of this surface, closed on exit."""
        if self.name == "async":
            async with connect(base_url, api_key) as client:
                yield client
            return
        blocking = await asyncio.to_thread(
            FiretitanServiceClient, base_url=base_url, api_key=api_key, config=FAST_CLIENT
        )
        try:
            yield blocking
        finally:
            await asyncio.to_thread(blocking.close)

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.name == "async":
            outcome = method(*args, **kwargs)
            return await outcome if inspect.isawaitable(outcome) else outcome
        outcome = await asyncio.to_thread(method, *args, **kwargs)
        if isinstance(outcome, APIFuture):
            return await asyncio.to_thread(outcome.result)
        return outcome


SURFACES = (Surface("async"), Surface("sync"))


def save_tiny_llama(directory: Path, seed: int, **config: Any) -> None:
    """A randomly initialised two-layer Llama (hidden size 64) saved as a Hugging Face
    checkpoint in ``directory``; ``config``: its vocabulary, special tokens, ..."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**shape, **config)).save_pretrained(str(directory))


def save_tokenizer(directory: Path, inner: Tokenizer) -> PreTrainedTokenizerFast:
    """``inner`` as a Hugging Face tokenizer with ``<unk>``, ``<s>`` (BOS) and ``</s>``
    (EOS), saved in ``directory``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))
    return fast


def sample_request(
    prompt: list[int], num_samples: int, params: tinker.SamplingParams, **options: Any
) -> _wire.SampleRequest:
    """An ``asample`` request as `Engine.sample` takes it, from a prompt's token ids;
    ``options`` are its other fields, ``target_prompt_logprobs`` as a dense id array."""
    targets = options.pop("target_prompt_logprobs", None)
    return _wire.SampleRequest(
        prompt=tinker.ModelInput.from_ints(prompt),
        num_samples=num_samples,
        sampling_params=params,
        target_prompt_logprobs=None if targets is None else tinker.TensorData.from_numpy(targets),
        **options,
    )


def shifted_datum(types: Any, tokens: list[int]) -> Any:
    """A datum that reads ``tokens`` and predicts each next one (the last target is 0),
    weight 1 each, built with ``types`` (``tinker``, or an SDK's own types module)."""
    n = len(tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[*tokens[1:], 0], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def next_token_datum(types: Any, tokens: list[int], weights: list[float] | None = None) -> Any:
    """Next-token prediction: inputs ``tokens[:-1]``, targets ``tokens[1:]``, weighted by
    ``weights[1:]`` (one weight per token; by default 1 each), built with ``types`` as in
    `shifted_datum`."""
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(
                data=weights[1:] if weights else [1.0] * n, dtype="float32", shape=[n]
            ),
        },
    )
