"""RMSNorm as Llama computes it, y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), and its input
gradient, one program per row; the weight is frozen (no weight gradient). Imports torch and triton
only."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import next_power_of_2
from .rounding import TL_DTYPES, to_dtype_rne


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, N, stride, eps, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    xhat = to_dtype_rne(x * rstd, DTYPE).to(tl.float32)  # the normalized row in the input's dtype, as Llama
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride + cols, to_dtype_rne(w * xhat, DTYPE), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, N, stride, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32) * \
        tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    xhat = x * rstd
    dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
    tl.store(dx_ptr + row * stride + cols, to_dtype_rne(dx, DTYPE), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@on_tensor_device
def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's dtype and shape, float32 rstd per row)."""
    x2 = _rows(x)
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    N = x2.shape[1]
    block = next_power_of_2(N)
    if x2.shape[0]:
        _rmsnorm_fwd[(x2.shape[0],)](x2, weight, y, rstd, N, x2.stride(0), eps, DTYPE=TL_DTYPES[x.dtype], BLOCK=block,
                                    num_warps=min(16, max(1, block // 512)))
    return y.view(x.shape), rstd


@on_tensor_device
def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dL/dx for dL/dy (the weight frozen), in x's dtype and shape."""
    dy2, x2 = _rows(dy.to(x.dtype)), _rows(x)
    dx = torch.empty_like(x2)
    N = x2.shape[1]
    block = next_power_of_2(N)
    if x2.shape[0]:
        _rmsnorm_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, N, x2.stride(0), DTYPE=TL_DTYPES[x.dtype], BLOCK=block,
                                    num_warps=min(16, max(1, block // 512)))
    return dx.view(x.shape)
