"""docs/losses.md is generated from the loss catalogue and must be current."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_losses_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_losses_doc", ROOT / "scripts" / "gen_losses_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_losses_doc"] = module
    spec.loader.exec_module(module)
    text = (ROOT / "docs" / "losses.md").read_text()
    assert text == module.render(), "docs/losses.md is stale: run scripts/gen_losses_doc.py"
    for name in ("cross_entropy", "ppo", "clip_low_threshold", "num_loss_tokens", "eps"):
        assert f"`{name}`" in text
