"""The local trainer's PyTorch engine: transformers models, LoRA, the losses of
``spec/losses.md``, AdamW, DCP checkpoints, sampler exports and sampling.

``from firetitan.local.torch import TorchEngine`` needs the ``local`` extra (torch,
transformers, safetensors).
"""

from __future__ import annotations

from firetitan.local.torch.engine import TorchEngine
from firetitan.local.torch.exports import materialize_snapshot, rebuild_snapshot
from firetitan.local.torch.models import SIZES
from firetitan.local.torch.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "SIZES",
    "ByteTokenizer",
    "Tokenizer",
    "TorchEngine",
    "materialize_snapshot",
    "rebuild_snapshot",
]
