"""Swap a model's nn.Linear layers for Linear4bit in place (the module-replacement step)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .linear4bit import Linear4bit


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def quantize_linears(model: nn.Module, *, skip_modules: Iterable[str] = ("lm_head",), quant_type: str = "nf4",
                     blocksize: int = 64, double_quant: bool = False, compute_dtype: torch.dtype | None = None,
                     quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Replace every nn.Linear whose qualified name does not match `skip_modules` (a name, a
    suffix after '.', or a parent path) with a Linear4bit; returns the model."""
    skip = tuple(skip_modules)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(name, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        q = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                   compute_dtype=compute_dtype, quant_storage=quant_storage, name=f"{name}.weight")
        setattr(parent, child, q)
    return model
