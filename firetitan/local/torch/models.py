"""Model construction: seeded stand-ins, Hugging Face loading, copies that share weights.

A *stand-in* is a small transformers model of the same family as the named base model
(Qwen3 for ``qwen`` names, Llama for ``llama`` names, Qwen3 otherwise) with random
weights drawn from a seed derived from ``(engine seed, base_model, size)``, so that every
engine built with the same seed sees the same base weights. Stand-ins use
`ByteTokenizer`'s vocabulary.

Weights are always float32 in memory ("master weights"); on CUDA the engine runs the
forward pass under bf16 autocast, which leaves parameters and optimizer state in float32.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from firetitan.local.torch.tokenizer import ByteTokenizer

__all__ = [
    "SIZES",
    "StandInSize",
    "build_standin",
    "cache_keyword",
    "clone_trainable",
    "context_length",
    "derive_seed",
    "family_for",
    "load_pretrained",
    "model_config",
    "model_from_config",
    "named_trainable",
    "share_frozen",
    "standin_config",
    "tensor_digest",
    "unique_state",
    "vocab_size",
]


@attrs.frozen
class StandInSize:
    """Dimensions of a stand-in preset."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int = 4096


#: ``tiny`` (1.7M parameters): the default for tests and the demo; a forward_backward of
#: four 64-token sequences takes ~50-70 ms on one CPU core. ``small`` (25M parameters).
SIZES: dict[str, StandInSize] = {
    "tiny": StandInSize(hidden=256, layers=2, intermediate=768, heads=4, kv_heads=2, head_dim=64),
    "small": StandInSize(hidden=512, layers=8, intermediate=1536, heads=8, kv_heads=4, head_dim=64),
}


# Engines of several trainers in one process build models on their own threads. Two
# things in a build are process-wide and not thread-safe: transformers imports its
# classes lazily (concurrent first imports fail with "cannot import name"), and a seeded
# build draws from torch's global RNG (concurrent builds would interleave their draws and
# get other weights). Builds and those imports therefore run under this lock.
_BUILD_LOCK = threading.RLock()


def family_for(base_model: str) -> str:
    """``"llama"`` for Llama names, ``"qwen3"`` for everything else."""
    return "llama" if "llama" in base_model.lower() else "qwen3"


def standin_config(base_model: str, size: str) -> Any:
    """The transformers config of the stand-in for ``base_model`` at preset ``size``.

    Raises:
        ValueError: ``size`` is not a preset name.
    """
    if size not in SIZES:
        raise ValueError(f"unknown stand-in size {size!r}; choose one of {sorted(SIZES)}")
    dims = SIZES[size]
    tok = ByteTokenizer()
    common: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "max_position_embeddings": dims.max_positions,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False,
    }
    with _BUILD_LOCK:
        if family_for(base_model) == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(**common)
        from transformers import Qwen3Config

        return Qwen3Config(**common)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes (never Python's salted
    ``hash``), so that everything seeded from it depends only on the inputs."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()  # no dropout anywhere: training and sampling are deterministic functions
    module.requires_grad_(False)
    return module


def model_from_config(config: Any, seed: int = 0) -> nn.Module:
    """Build a causal LM from a transformers config with seeded random weights.

    The global RNG is forked, so building a model neither depends on nor disturbs the
    caller's random state.
    """
    with _BUILD_LOCK:
        from transformers import AutoModelForCausalLM

        auto: Any = AutoModelForCausalLM  # transformers is untyped
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = auto.from_config(config, dtype=torch.float32)
    return _frozen(module)


def build_standin(base_model: str, size: str, seed: int) -> nn.Module:
    """The seeded stand-in for ``base_model``: frozen, float32, on the CPU.

    Raises:
        ValueError: ``size`` is not a preset name.
    """
    config = standin_config(base_model, size)
    return model_from_config(config, derive_seed("stand-in", seed, base_model, size))


def load_pretrained(directory: Path) -> nn.Module:
    """Load real weights from a local Hugging Face directory: frozen, float32, on the CPU.

    Only safetensors weights are accepted (``use_safetensors=True``), so loading never
    unpickles, and only local files are read.

    Raises:
        ValueError: The directory holds no loadable causal-LM checkpoint.
    """
    try:
        with _BUILD_LOCK:
            from transformers import AutoModelForCausalLM

            auto: Any = AutoModelForCausalLM  # transformers is untyped
            module = auto.from_pretrained(
                str(directory), local_files_only=True, use_safetensors=True, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load a causal LM from {directory}: {exc}") from exc
    return _frozen(module)


def share_frozen(base: nn.Module) -> nn.Module:
    """A new module tree that shares every parameter object of ``base`` (no copy).

    Used for LoRA and base-only models: the frozen base weights exist once per base
    model however many models use them. ``deepcopy``'s memo maps each parameter to
    itself, so parameters (and any tying between them) are shared while buffers and
    submodules are copied.
    """
    memo: dict[int, Any] = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def clone_trainable(base: nn.Module) -> nn.Module:
    """An independent copy of ``base`` whose parameters all require gradients."""
    module = copy.deepcopy(base)
    module.requires_grad_(True)
    return module


def unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with tied tensors listed once (first name wins).

    Hugging Face checkpoints store a tied output embedding once and re-tie on load;
    safetensors refuses two names for one storage.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def context_length(module: nn.Module) -> int:
    """The longest sequence the model accepts."""
    return int(model_config(module).max_position_embeddings)


def vocab_size(module: nn.Module) -> int:
    """The number of logits per position; valid token ids are below it."""
    return int(model_config(module).vocab_size)


def model_config(module: nn.Module) -> Any:
    """The transformers config of a model (``module.config``, untyped)."""
    return module.config


_CACHE_KEYWORDS: dict[type, str] = {}


def cache_keyword(module: nn.Module) -> str:
    """The name of the KV-cache argument of the model's ``forward``.

    transformers 5 calls it ``cache``; earlier releases ``past_key_values`` (which
    5.x still accepts with a deprecation warning).
    """
    cls = type(module)
    if cls not in _CACHE_KEYWORDS:
        params = inspect.signature(module.forward).parameters
        _CACHE_KEYWORDS[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORDS[cls]


def named_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require gradients, by name, in module order (tied ones once)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
