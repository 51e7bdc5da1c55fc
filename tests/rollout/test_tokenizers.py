"""The public stand-in tokenizer and tokenizer loading."""

from __future__ import annotations

import subprocess
import sys

import pytest

import firetitan
import firetitan.tokenizers
from firetitan.tokenizers import BYTE_TOKENIZER_NAME, ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_text_and_frames_it() -> None:
    tok = firetitan.ByteTokenizer()
    ids = tok.encode("7=seven", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "7=seven"
    assert tok.decode(ids, skip_special_tokens=False) == "7=seven"
    assert tok.vocab_size == 264 and tok.name == BYTE_TOKENIZER_NAME


def test_the_trainer_engine_uses_the_same_tokenizer() -> None:
    from firetitan.local.torch.tokenizer import ByteTokenizer as EngineTokenizer

    assert EngineTokenizer is ByteTokenizer


def test_the_module_works_where_torch_and_transformers_cannot_be_imported() -> None:
    # The file alone, with both packages blocked: nothing in it needs them.
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None;"
        "sys.modules['transformers'] = None;"
        f"spec = importlib.util.spec_from_file_location('tok', {firetitan.tokenizers.__file__!r});"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod);"
        "print(mod.ByteTokenizer().decode(mod.ByteTokenizer().encode('ok')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_load_tokenizer_by_name_and_from_a_local_folder(tmp_path: pytest.TempPathFactory) -> None:
    assert load_tokenizer(BYTE_TOKENIZER_NAME) == ByteTokenizer()
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]").save_pretrained(
        tmp_path
    )
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world", add_special_tokens=False) == [1, 2]
