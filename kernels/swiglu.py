"""SwiGLU as Llama's MLP computes it, h = silu(g) * u (silu's output rounded to the dtype first, as
torch does), and its gradients for g and u, each one pass over flat tensors. Imports torch and
triton only."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import cdiv
from .rounding import TL_DTYPES, to_dtype_rne

BLOCK = 2048  # elements per program


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = to_dtype_rne(g / (1.0 + tl.exp(-g)), DTYPE).to(tl.float32)
    tl.store(h_ptr + offs, to_dtype_rne(s * u, DTYPE), mask=mask)


@triton.jit
def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = to_dtype_rne(g * sig, DTYPE).to(tl.float32)
    ds = to_dtype_rne(dh * u, DTYPE).to(tl.float32)
    tl.store(du_ptr + offs, to_dtype_rne(dh * s, DTYPE), mask=mask)
    tl.store(dg_ptr + offs, to_dtype_rne(ds * sig * (1.0 + g * (1.0 - sig)), DTYPE), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (cdiv(n, BLOCK),)


@on_tensor_device
def forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for contiguous g, u of one shape and dtype."""
    h = torch.empty_like(g)
    if g.numel():
        _swiglu_fwd[_grid(g.numel())](g, u, h, g.numel(), DTYPE=TL_DTYPES[g.dtype], BLOCK=BLOCK)
    return h


@on_tensor_device
def backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dg, dL/du) for dL/dh."""
    dh = dh.to(g.dtype).contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        _swiglu_bwd[_grid(g.numel())](dh, g, u, dg, du, g.numel(), DTYPE=TL_DTYPES[g.dtype], BLOCK=BLOCK)
    return dg, du
