"""The demo's task: spell a digit as an English word (``"7="`` -> ``"seven"``).

Why this task: the answer is checked by a one-line verifier, a newcomer can read every
prompt and answer, and a ~2M-parameter model learns it within a couple of minutes on a
CPU. The warm-up corpus is deliberately *noisy*: only `CORPUS_ACCURACY` of its answers
are right, the rest are other number words. Supervised training on it teaches the
format (a digit, ``=``, one number word, end of sequence) but not reliably which word;
reinforcement learning against the verifier then teaches the right one. The rising
reward is therefore learnt from the reward alone.

Everything is in token ids of the byte-level vocabulary of the local trainer's stand-in
models (`ByteTokenizer`): ids 0-255 are UTF-8 bytes, then BOS and EOS.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence

import attrs
import numpy as np
import tinker

from firetitan.tokenizers import ByteTokenizer

__all__ = [
    "CORPUS_ACCURACY",
    "DIGITS",
    "WORDS",
    "Example",
    "completion_ids",
    "completion_text",
    "count_right",
    "prompt_ids",
    "prompt_text",
    "reward",
    "sft_corpus",
    "sft_datum",
    "shifted",
    "tokenizer",
]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS = tuple(range(len(WORDS)))
#: Share of warm-up examples whose answer is right. Low enough that RL has to do the
#: real work (the warmed-up model samples the right word ~20% of the time), high enough
#: that the right word is among its guesses, so sampled groups carry a signal.
CORPUS_ACCURACY = 0.3


@functools.cache
def tokenizer() -> ByteTokenizer:
    """The stand-ins' byte-level tokenizer."""
    return ByteTokenizer()


@attrs.frozen
class Example:
    """One warm-up example: a digit and the word the corpus pairs it with."""

    digit: int
    word: str


def prompt_text(digit: int) -> str:
    """The prompt for ``digit``, e.g. ``"7="``."""
    return f"{digit}="


def prompt_ids(digit: int) -> list[int]:
    """BOS, then the prompt's bytes."""
    return tokenizer().encode(prompt_text(digit), add_bos=True)


def completion_ids(word: str) -> list[int]:
    """The answer's bytes, then EOS (where sampling stops)."""
    return tokenizer().encode(word, add_eos=True)


def completion_text(tokens: Sequence[int]) -> str:
    """The text of sampled tokens (special ids such as EOS dropped)."""
    return tokenizer().decode(tokens)


def reward(digit: int, completion: str) -> float:
    """1.0 when ``completion`` spells ``digit`` exactly, else 0.0."""
    return 1.0 if completion == WORDS[digit] else 0.0


def count_right(answers: Mapping[str, str]) -> int:
    """How many digits' prompts (keys: prompt text) have the right answer."""
    return sum(reward(d, answers.get(prompt_text(d), "")) == 1.0 for d in DIGITS)


def sft_corpus(size: int, seed: int) -> list[Example]:
    """The noisy warm-up corpus: ``size`` examples, the same for the same seed."""
    rng = random.Random(seed)
    examples = []
    for _ in range(size):
        digit = rng.choice(DIGITS)
        if rng.random() < CORPUS_ACCURACY:
            word = WORDS[digit]
        else:
            word = rng.choice([w for w in WORDS if w != WORDS[digit]])
        examples.append(Example(digit, word))
    return examples


def shifted(tokens: Sequence[int]) -> tuple[tinker.ModelInput, np.ndarray]:
    """Split a full sequence into the model input and the next-token targets.

    Position ``i`` of the input predicts target ``i`` (token ``i + 1`` of the sequence),
    as every loss in ``spec/losses.md`` expects.
    """
    ids = np.asarray(tokens, dtype=np.int64)
    return tinker.ModelInput.from_ints(ids[:-1].tolist()), ids[1:]


def sft_datum(example: Example) -> tinker.Datum:
    """A ``cross_entropy`` datum that trains on the answer and its EOS, not the prompt."""
    prompt = prompt_ids(example.digit)
    completion = completion_ids(example.word)
    model_input, targets = shifted(prompt + completion)
    weights = np.zeros(len(targets), dtype=np.float32)
    weights[len(prompt) - 1 :] = 1.0
    return tinker.Datum(
        model_input=model_input,
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(targets),
            "weights": tinker.TensorData.from_numpy(weights),
        },
    )
