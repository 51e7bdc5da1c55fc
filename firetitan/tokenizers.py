"""Tokenizers on the client side: the byte-level stand-in tokenizer, and loading a
configured Hugging Face tokenizer.

`ByteTokenizer` needs nothing installed (no torch, no transformers, no vocabulary
file): it is the tokenizer of the local trainer's seeded stand-in models, and what
``get_tokenizer()`` returns for them. A configured tokenizer (a Hugging Face name or a
local folder) is loaded with ``transformers``, which is imported only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BYTE_TOKENIZER_NAME", "ByteTokenizer", "load_tokenizer"]

#: The name a trainer reports (``get_info().model_data.tokenizer_id``) for `ByteTokenizer`.
BYTE_TOKENIZER_NAME = "firetitan/byte"


class ByteTokenizer:
    """Bytes are tokens: ids 0-255 are the UTF-8 bytes of the text, then a few specials.

    Text in and out is readable and needs no vocabulary file, which is what the seeded
    stand-in models want. ``decode`` drops special tokens and replaces invalid UTF-8.
    Sampled sequences may hold specials (one that stopped on its own ends with 257), so
    ``bytes(sequence.tokens)`` can fail where ``decode(sequence.tokens)`` does not. Ids
    259-263 are reserved.

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
        return BYTE_TOKENIZER_NAME

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as ids, optionally framed by BOS/EOS."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], **_options: Any) -> str:
        """Return the text of the byte ids in ``ids``; special ids are skipped.

        Keyword options of Hugging Face's ``decode`` (``skip_special_tokens``...) are
        accepted and change nothing: special ids have no text here.
        """
        return bytes(i for i in ids if 0 <= i < self.BYTE_COUNT).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Return the tokenizer named ``name_or_path``.

    Args:
        name_or_path: `BYTE_TOKENIZER_NAME` for `ByteTokenizer`; a local folder holding
            Hugging Face tokenizer files; or a Hugging Face hub name (downloaded by
            ``transformers`` unless cached).

    Returns:
        A `ByteTokenizer`, or a ``transformers`` tokenizer.

    Raises:
        ImportError: ``transformers`` is not installed (it is needed for anything but
            the byte tokenizer).
        OSError: ``transformers`` could not find or fetch the tokenizer.
    """
    if str(name_or_path) == BYTE_TOKENIZER_NAME:
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            f"loading the tokenizer {str(name_or_path)!r} needs transformers "
            "(pip install transformers)"
        ) from exc
    return AutoTokenizer.from_pretrained(str(name_or_path))
