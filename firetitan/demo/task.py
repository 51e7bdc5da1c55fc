"""The demo's task: spell a digit as an English word (``"7="`` -> ``"seven"``).

Why this task: the answer is checked by a one-line verifier, a newcomer can read every
prompt and answer, and a ~2M-parameter model learns it within a couple of minutes on a
CPU. The warm-up corpus is deliberately *noisy*: only `CORPUS_ACCURACY` of its answers
are right, the rest are other number words. Supervised training on it teaches the
format (a digit, ``=``, one number word, end of sequence) but not reliably which word;
reinforcement learning against the verifier then teaches the right one. The rising
reward is therefore learnt from the reward alone.

Prompts and answers are text; a `Vocabulary` turns them into the token ids of the
tokenizer the trainer's model uses (`BYTES` for the local trainer's stand-ins, whose ids
0-255 are UTF-8 bytes, then BOS and EOS).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import tinker

from firetitan.tokenizers import ByteTokenizer

__all__ = [
    "BYTES",
    "CORPUS_ACCURACY",
    "DIGITS",
    "WORDS",
    "Example",
    "Vocabulary",
    "count_right",
    "prompt_text",
    "reward",
    "sft_corpus",
    "shifted",
]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS = tuple(range(len(WORDS)))
#: Share of warm-up examples whose answer is right. Low enough that RL has to do the
#: real work (the warmed-up model samples the right word ~20% of the time), high enough
#: that the right word is among its guesses, so sampled groups carry a signal.
CORPUS_ACCURACY = 0.3


@attrs.frozen
class Example:
    """One warm-up example: a digit and the word the corpus pairs it with."""

    digit: int
    word: str


def prompt_text(digit: int) -> str:
    """The prompt for ``digit``, e.g. ``"7="``."""
    return f"{digit}="


class Vocabulary:
    """The task in the token ids of one tokenizer: the one the trainer's model uses.

    Prompts and answers are text, so any tokenizer with an end-of-sequence token will
    do: `ByteTokenizer` (the stand-ins'), or a Hugging Face tokenizer.

    Args:
        tokenizer: A `ByteTokenizer` or a ``transformers`` tokenizer.

    Raises:
        ValueError: The tokenizer has no end-of-sequence token, which ends every answer
            (and stops sampling).
    """

    def __init__(self, tokenizer: Any) -> None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(
                f"the tokenizer {_name(tokenizer)!r} has no end-of-sequence token; the "
                "demo's answers end with one"
            )
        bos = getattr(tokenizer, "bos_token_id", None)
        self.tokenizer = tokenizer
        self.name = _name(tokenizer)
        self._eos = [int(eos)]
        self._bos = [] if bos is None else [int(bos)]

    def __repr__(self) -> str:
        return f"Vocabulary({self.name!r})"

    def _ids(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text)
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def prompt_ids(self, digit: int) -> list[int]:
        """BOS (where the tokenizer has one), then the prompt's tokens."""
        return self._bos + self._ids(prompt_text(digit))

    def completion_ids(self, word: str) -> list[int]:
        """The answer's tokens, then EOS (where sampling stops)."""
        return self._ids(word) + self._eos

    def completion_text(self, tokens: Sequence[int]) -> str:
        """The text of sampled tokens (special ids such as EOS dropped)."""
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def sft_datum(self, example: Example) -> tinker.Datum:
        """A ``cross_entropy`` datum that trains on the answer and its EOS, not the
        prompt."""
        prompt = self.prompt_ids(example.digit)
        completion = self.completion_ids(example.word)
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


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name", None) or getattr(tokenizer, "name_or_path", "?"))


#: The task in the byte-level vocabulary of the local trainer's stand-in models.
BYTES = Vocabulary(ByteTokenizer())


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
