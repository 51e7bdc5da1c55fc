"""Tokenizers for the torch engine: the byte-level one for stand-in models (its home is
the public, torch-free `firetitan.tokenizers`), an adapter for Hugging Face tokenizers
that come with real weights.

The engine itself works on token ids only. It needs a tokenizer for two things: decoding
generated text to look for string ``stop`` sequences, and naming the end-of-sequence token
that stops sampling by default. Demos and tests use `ByteTokenizer` to build datums.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from firetitan.tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_hf_tokenizer"]


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """Adapter from a ``transformers`` tokenizer to `Tokenizer`."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    @property
    def vocab_size(self) -> int:
        return len(self._inner)

    @property
    def eos_token_id(self) -> int | None:
        eos = self._inner.eos_token_id
        return None if eos is None else int(eos)

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._inner.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._inner.decode(list(ids), skip_special_tokens=False))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_tokenizer(directory: Path) -> HFTokenizer | None:
    """Load the tokenizer stored next to Hugging Face weights, or None if there is none.

    Only local files are read (``local_files_only``); nothing is downloaded.
    """
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    inner = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return HFTokenizer(inner, directory.name)
