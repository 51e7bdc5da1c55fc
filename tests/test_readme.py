"""The README's Python snippets are valid Python, and the files it names exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_python_snippet_compiles() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for i, block in enumerate(blocks):
        # Snippets of the async client use await at the top level, as in a notebook.
        compile(block, f"README.md python block {i}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_examples_and_docs_it_names_exist() -> None:
    named = set(re.findall(r"`((?:examples|docs)/[\w./-]+)`", README))
    assert any(n.startswith("examples/") for n in named)
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
