"""Merging the LoRA adapters of a loaded peft model into qtune's quantized layers."""

from __future__ import annotations

import torch
from torch import nn


def merge_adapter(model, dtype: torch.dtype | None = None, quantize: str | None = None) -> nn.Module:
    """Merge the active LoRA adapters of a loaded peft model into its layers and return the plain
    model: qtune Linear4bit layers are dequantized, the scaled B @ A added, and become nn.Linear
    (in `dtype`, default the weight's) or, with quantize="nf4"/"fp4", Linear4bit again."""
    from peft.tuners.lora import LoraLayer

    from ..nn import Linear4bit

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, Linear4bit):
            base = module.base_layer
            w = base.dequantize(torch.float32)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    w = w + module.get_delta_weight(adapter).float()
            lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                            device=w.device, dtype=dtype or base.weight_dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if base.bias is not None:
                    lin.bias.copy_(base.bias)
            new = lin if quantize is None else Linear4bit.from_linear(
                lin, quant_type=quantize, blocksize=base.blocksize, double_quant=base.double_quant,
                compute_dtype=base.compute_dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
