"""Tokenizers for the torch engine: a byte-level one for stand-in models, an adapter for
Hugging Face tokenizers that come with real weights.

The engine itself works on token ids only. It needs a tokenizer for two things: decoding
generated text to look for string ``stop`` sequences, and naming the end-of-sequence token
that stops sampling by default. Demos and tests use `ByteTokenizer` to build datums.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

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


class ByteTokenizer:
    """Bytes are tokens: ids 0-255 are the UTF-8 bytes of the text, then a few specials.

    Text in and out is readable and needs no vocabulary file, which is what the seeded
    stand-in models want. ``decode`` drops special tokens and replaces invalid UTF-8.

    Attributes:
        bos_token_id: Beginning of sequence (256).
        eos_token_id: End of sequence (257); sampling stops on it by default.
        pad_token_id: Padding (258); never a training target by convention.
    """

    BYTE_COUNT = 256
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    #: 256 bytes + BOS/EOS/PAD + 5 reserved ids, a multiple of 8 for friendly matmul shapes.
    VOCAB_SIZE = 264

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def name(self) -> str:
        return "firetitan/byte"

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as ids, optionally framed by BOS/EOS."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of the byte ids in ``ids``; special ids are skipped."""
        return bytes(i for i in ids if 0 <= i < self.BYTE_COUNT).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


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
