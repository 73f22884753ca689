"""Embedding lookup (rows of a table gathered by index) where the table may sit in pinned host
memory: each program copies one row chunk over the bus into GPU memory, so a frozen embedding
table needs no GPU memory. Imports torch and triton only."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import cdiv

BLOCK = 1024  # row elements per program


@triton.jit
def _gather_kernel(ids_ptr, w_ptr, out_ptr, D, w_stride, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    row = tl.load(ids_ptr + t).to(tl.int64)
    tl.store(out_ptr + t.to(tl.int64) * D + d, tl.load(w_ptr + row * w_stride + d, mask=mask), mask=mask)


@on_tensor_device
def gather_rows(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[ids] as a new tensor on ids' device, of shape ids.shape + (D,). `weight` (V, D) with
    unit stride along D: on ids' GPU or in pinned host memory. ids must lie in [0, V)."""
    D = weight.shape[1]
    out = torch.empty(*ids.shape, D, dtype=weight.dtype, device=ids.device)
    n = ids.numel()
    if n:
        _gather_kernel[(n, cdiv(D, BLOCK))](ids.contiguous(), weight, out, D, weight.stride(0), BLOCK=BLOCK)
    return out
