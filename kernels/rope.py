"""Rotary position embedding as Llama applies it, x*cos + rotate_half(x)*sin with rotate_half(x) =
(-x2, x1), and its input gradient (the inverse rotation), for a (B, H, S, D) tensor of any strides
and (B or 1, S, D) cos/sin; computed in float32 and rounded once. Imports torch and triton only."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import cdiv
from .rounding import TL_DTYPES, to_dtype_rne

ROWS = 16  # (b, h, s) rows per program


@triton.jit
def _rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, n_rows, H, S, sxb, sxh, sxs, syb, syh, sys_, scb, scs,
                 SIGN: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr, ROWS: tl.constexpr):
    """y1 = x1 c1 - SIGN x2 s1, y2 = x2 c2 + SIGN x1 s2 (SIGN 1: forward; -1: the gradient)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = r < n_rows
    b, h, s = r // (H * S), (r // S) % H, r % S
    d = tl.arange(0, HALF)
    x_row = x_ptr + (b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + s.to(tl.int64) * sxs)[:, None] + d[None, :]
    y_row = y_ptr + (b.to(tl.int64) * syb + h.to(tl.int64) * syh + s.to(tl.int64) * sys_)[:, None] + d[None, :]
    c_off = (b.to(tl.int64) * scb + s.to(tl.int64) * scs)[:, None] + d[None, :]
    m = mask[:, None]
    x1 = tl.load(x_row, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_off, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_off + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_off, mask=m, other=0.0).to(tl.float32) * SIGN
    s2 = tl.load(sin_ptr + c_off + HALF, mask=m, other=0.0).to(tl.float32) * SIGN
    tl.store(y_row, to_dtype_rne(x1 * c1 - x2 * s1, DTYPE), mask=m)
    tl.store(y_row + HALF, to_dtype_rne(x2 * c2 + x1 * s2, DTYPE), mask=m)


@on_tensor_device
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (B, H, S, D) rotated by cos/sin (B or 1, S, D); `inverse`: by the transpose (the gradient).
    The result has x's strides."""
    B, H, S, D = x.shape
    y = torch.empty_like(x)
    cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    n = B * H * S
    if n:
        _rope_kernel[(cdiv(n, ROWS),)](x, y, cos, sin, n, H, S, *x.stride()[:3], *y.stride()[:3],
                                             cos.stride(0), cos.stride(1), SIGN=-1.0 if inverse else 1.0,
                                             HALF=D // 2, DTYPE=TL_DTYPES[x.dtype], ROWS=ROWS)
    return y
