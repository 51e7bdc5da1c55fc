"""A servable model from the tensors of a sampler export.

Shared by the trainer's own sampling (`TorchEngine`) and the inference deployment
(`firetitan.local.deployment`), so both turn an export into exactly the same module:

* ``hf`` exports: a model built from the export's ``config.json`` with its tensors;
* ``peft`` exports: the named base model's frozen weights (shared, never copied) with
  the adapter applied, refused when the export was trained on other base weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from firetitan.local.torch import exports
from firetitan.local.torch.lora import PEFT_PREFIX, apply_lora, lora_modules, settings_from_peft
from firetitan.local.torch.models import model_from_config, share_frozen, unique_state

__all__ = ["BaseLookup", "module_from_export"]

#: Given a base model name, its frozen module and the digest of its weights.
BaseLookup = Callable[[str], tuple[nn.Module, str]]


def module_from_export(
    export_dir: Path,
    meta: exports.ExportMeta,
    tensors: Mapping[str, torch.Tensor],
    *,
    base: BaseLookup,
    device: torch.device,
) -> nn.Module:
    """The frozen module that an export's full ``tensors`` describe, on ``device``.

    Raises:
        ValueError: The tensors do not match the export's config, or a LoRA export was
            trained on other base weights than ``base`` returns.
    """
    config_path = exports.config_file(export_dir, meta)
    if meta["format"] == "hf":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(config_path.parent), local_files_only=True)
        module = model_from_config(config)
        result = module.load_state_dict(dict(tensors), strict=False)
        if result.unexpected_keys or set(unique_state(module)) != set(tensors):
            raise ValueError("its tensors do not match its config.json")
        return module.to(device)
    base_name = str(meta.get("base_model"))
    base_module, base_digest = base(base_name)
    if meta.get("base_digest") != base_digest:
        raise ValueError(f"it was trained on other base weights than {base_name!r} here")
    settings = settings_from_peft(json.loads(config_path.read_text()))
    module = share_frozen(base_module)
    apply_lora(module, settings)
    expected = {
        f"{PEFT_PREFIX}{name}.{factor}.weight"
        for name, _ in lora_modules(module)
        for factor in ("lora_A", "lora_B")
    }
    if expected != set(tensors):
        raise ValueError("its adapter tensors do not match its adapter_config.json")
    with torch.no_grad():
        for name, layer in lora_modules(module):
            layer.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    module.requires_grad_(False)
    return module.to(device)
