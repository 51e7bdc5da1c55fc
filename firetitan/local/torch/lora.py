"""A small LoRA wrapper around ``nn.Linear``, with PEFT-compatible names.

``LoRALinear`` computes ``base(x) + lora_B(lora_A(x)) * alpha / rank``. ``lora_A`` is
initialised like PEFT's default (Kaiming-uniform with ``a=sqrt(5)``, from a seeded
generator) and ``lora_B`` with zeros, so a fresh adapter leaves the model's outputs
unchanged. The base layer stays frozen and is shared with other models of the same base.

Parameter names follow PEFT: wrapping ``model.layers.0.self_attn.q_proj`` gives
``model.layers.0.self_attn.q_proj.lora_A.weight``; prefixing ``base_model.model.`` gives
the key PEFT stores in ``adapter_model.safetensors``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTN_TARGETS",
    "MLP_TARGETS",
    "PEFT_PREFIX",
    "UNEMBED_TARGETS",
    "LoRALinear",
    "LoraSettings",
    "apply_lora",
    "merged_state",
    "peft_adapter_config",
]

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
UNEMBED_TARGETS = ("lm_head",)
PEFT_PREFIX = "base_model.model."


@attrs.frozen(kw_only=True)
class LoraSettings:
    """A LoRA configuration as the engine applies it.

    Attributes:
        rank: Adapter rank (> 0).
        alpha: Scaling numerator; the adapter output is multiplied by ``alpha / rank``.
        targets: Names of the ``nn.Linear`` attributes that get adapters.
        seed: Seed of the ``lora_A`` initialisation.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_flags(
        cls, *, rank: int, alpha: float, seed: int, mlp: bool, attn: bool, unembed: bool
    ) -> LoraSettings:
        targets = (
            (ATTN_TARGETS if attn else ())
            + (MLP_TARGETS if mlp else ())
            + (UNEMBED_TARGETS if unembed else ())
        )
        return cls(rank=rank, alpha=alpha, targets=targets, seed=seed)


class _Factor(nn.Module):
    """One LoRA matrix, as a module so that its parameter is named ``<factor>.weight``."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        # Allocated uninitialised and filled by the caller: nn.Linear's own init would
        # draw from the global RNG.
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoRALinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(x)) * scaling`` with a frozen ``base_layer``."""

    def __init__(
        self, base_layer: nn.Linear, rank: int, scaling: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.scaling = scaling
        self.lora_A = _Factor(rank, self.in_features)
        self.lora_B = _Factor(self.out_features, rank)
        with torch.no_grad():
            # PEFT's default: kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)).
            # Drawn on the CPU, where the generator lives, then moved next to the base.
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            self.lora_B.weight.zero_()
        device = base_layer.weight.device
        self.lora_A.to(device)
        self.lora_B.to(device)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``layer.weight`` (e.g. tying checks)."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling
        return out

    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B @ A`` in float32, detached."""
        w = self.base_layer.weight.detach().float()
        delta = self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()
        return w + delta * self.scaling


def apply_lora(module: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap every ``nn.Linear`` named in ``settings.targets`` in place.

    ``module``'s own parameters must already be frozen; the new adapter parameters
    require gradients. Adapters are created in module order from one generator seeded
    with ``settings.seed``, so the initialisation is reproducible.

    Returns:
        The dotted names of the wrapped layers.

    Raises:
        ValueError: No layer matched the targets.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    wanted = set(settings.targets)
    sites: list[tuple[str, nn.Module, str, nn.Linear]] = []
    for name, parent in module.named_modules():
        for attr, child in parent.named_children():
            if attr in wanted and isinstance(child, nn.Linear):
                sites.append((f"{name}.{attr}" if name else attr, parent, attr, child))
    if not sites:
        raise ValueError(f"no linear layer named any of {sorted(wanted)} to put LoRA on")
    for _, parent, attr, child in sites:
        setattr(parent, attr, LoRALinear(child, settings.rank, settings.scaling, generator))
    return [site[0] for site in sites]


def lora_modules(module: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    """The LoRA layers of ``module`` with their dotted names."""
    for name, child in module.named_modules():
        if isinstance(child, LoRALinear):
            yield name, child


def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state of a LoRA model with every adapter folded into its base weight,
    under the base model's own names (``...q_proj.weight``).

    Tied tensors are listed once, except that a merged weight is always listed: an
    adapter on a tied output layer unties it (the caller must then write
    ``tie_word_embeddings: false``).
    """
    merged = {
        f"{name}.base_layer.weight": layer.merged_weight() for name, layer in lora_modules(module)
    }
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in module.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key in merged:
            out[key.replace(".base_layer.", ".")] = merged[key]
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident not in seen:
            seen.add(ident)
            out[key] = tensor
    return out


def peft_adapter_config(settings: LoraSettings, base_model: str) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for this adapter."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(settings.alpha) if settings.alpha.is_integer() else settings.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": settings.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(settings.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def settings_from_peft(config: Mapping[str, Any], seed: int = 0) -> LoraSettings:
    """Read back what `peft_adapter_config` wrote.

    Raises:
        ValueError: The config is not a plain LoRA config this wrapper can apply.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter is {config.get('peft_type')!r}, not LORA")
    if config.get("use_dora") or config.get("use_rslora") or config.get("rank_pattern"):
        raise ValueError("DoRA, rsLoRA and per-layer ranks are not supported")
    rank = config.get("r")
    alpha = config.get("lora_alpha")
    targets = config.get("target_modules")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, int | float):
        raise ValueError("adapter config needs a positive integer 'r' and a numeric 'lora_alpha'")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError("adapter config needs 'target_modules' as a list of names")
    return LoraSettings(rank=rank, alpha=float(alpha), targets=tuple(targets), seed=seed)
