"""Quantize to the 4-bit formats (NF4/FP4, bitsandbytes' layout and rounding) and the 8-bit
blockwise quantization of double quantization, and their launchers. Imports torch and triton only.

Rounding matches qtune's torch reference bit for bit: x times the float32 reciprocal (rounded
division) of its block's absmax, then float32 threshold comparisons; the nested 8-bit codes come
from the same 7-step binary search the reference emulates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

VALUES_PER_PROGRAM = 2048


@triton.jit
def _nf4_code(s, T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14):
    """Number of NF4 midpoints below s: the nibble of the nearest code, ties to the lower."""
    return ((s > T0).to(tl.int32) + (s > T1).to(tl.int32) + (s > T2).to(tl.int32) + (s > T3).to(tl.int32)
            + (s > T4).to(tl.int32) + (s > T5).to(tl.int32) + (s > T6).to(tl.int32) + (s > T7).to(tl.int32)
            + (s > T8).to(tl.int32) + (s > T9).to(tl.int32) + (s > T10).to(tl.int32) + (s > T11).to(tl.int32)
            + (s > T12).to(tl.int32) + (s > T13).to(tl.int32) + (s > T14).to(tl.int32))


@triton.jit
def _fp4_code(s, mags_ptr, T0, T1, T2, T3, T4, T5, T6):
    """Sign bit of s, then the nearest of the 8 magnitudes (ties to the smaller)."""
    a = tl.abs(s)
    i = ((a > T0).to(tl.int32) + (a > T1).to(tl.int32) + (a > T2).to(tl.int32) + (a > T3).to(tl.int32)
         + (a > T4).to(tl.int32) + (a > T5).to(tl.int32) + (a > T6).to(tl.int32))
    return tl.load(mags_ptr + i).to(tl.int32) | ((s < 0).to(tl.int32) << 3)


@triton.jit
def _quant4_kernel(x_ptr, packed_ptr, absmax_ptr, bad_ptr, mags_ptr, n, n_bytes, n_blocks,
                   T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14,
                   FP4: tl.constexpr, BLOCKSIZE: tl.constexpr, NB: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.atomic_add(bad_ptr, tl.sum(tl.sum((tl.abs(x) == float("inf")) | (x != x), axis=1).to(tl.int32), axis=0))
    absmax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax), 0.0)
    s = x * inv[:, None]
    if FP4:
        code = _fp4_code(s, mags_ptr, T0, T1, T2, T3, T4, T5, T6)
    else:
        code = _nf4_code(s, T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14)
    hi, lo = tl.split(code.reshape(NB * BLOCKSIZE // 2, 2))  # padding values are 0: the zero code
    b = tl.program_id(0).to(tl.int64) * (NB * BLOCKSIZE // 2) + tl.arange(0, NB * BLOCKSIZE // 2)
    tl.store(packed_ptr + b, ((hi << 4) | lo).to(tl.uint8), mask=b < n_bytes)
    tl.store(absmax_ptr + rows, absmax, mask=rows < n_blocks)


@triton.jit
def _quant8_kernel(x_ptr, offset_ptr, code_ptr, q_ptr, absmax_ptr, n, BLOCKSIZE: tl.constexpr):
    """One block of (x - offset): absmax, then each scaled value's code by binary search."""
    row = tl.program_id(0).to(tl.int64)
    offs = row * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0) - tl.load(offset_ptr)
    x = tl.where(offs < n, x, 0.0)
    absmax = tl.max(tl.abs(x), axis=0)
    inv = tl.where(absmax > 0, tl.math.div_rn(1.0, absmax), 0.0)
    s = x * inv
    pivot = tl.full(s.shape, 127, tl.int32)
    lo_pivot, hi_pivot = tl.zeros_like(pivot), tl.full(s.shape, 255, tl.int32)
    lo, hi = tl.full(s.shape, -1.0, tl.float32), tl.full(s.shape, 1.0, tl.float32)
    val = tl.load(code_ptr + pivot)
    for i in tl.static_range(7):
        up = s > val
        lo_pivot, lo = tl.where(up, pivot, lo_pivot), tl.where(up, val, lo)
        hi_pivot, hi = tl.where(up, hi_pivot, pivot), tl.where(up, hi, val)
        pivot = tl.where(up, pivot + (64 >> i), pivot - (64 >> i))
        val = tl.load(code_ptr + pivot)
    hi = tl.where(hi_pivot == 255, tl.load(code_ptr + 255), hi)
    lo = tl.where(lo_pivot == 0, tl.load(code_ptr), lo)
    up = s > val
    q = tl.where(up, tl.where(s > (hi + val) * 0.5, hi_pivot, pivot), tl.where(s < (lo + val) * 0.5, lo_pivot, pivot))
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=offs < n)
    tl.store(absmax_ptr + row, absmax)


def quantize_4bit(x: torch.Tensor, blocksize: int, fp4: bool, thresholds: tuple[float, ...], mags: torch.Tensor,
                  out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of x (any float dtype, contiguous) packed two per byte into `out` (uint8, at least
    ceil(n/2) bytes); returns (float32 absmax per block, int32 count of non-finite inputs as a
    1-element device tensor). `thresholds`: the 15 NF4 midpoints, or the 7 FP4 magnitude
    thresholds and `mags` the magnitude nibbles between them."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    bad = torch.zeros(1, dtype=torch.int32, device=x.device)
    nb = max(1, VALUES_PER_PROGRAM // blocksize)
    t = tuple(thresholds) + (0.0,) * (15 - len(thresholds))
    _quant4_kernel[(triton.cdiv(n_blocks, nb),)](x.reshape(-1), out, absmax, bad, mags, n, (n + 1) // 2, n_blocks,
                                                 *t, FP4=fp4, BLOCKSIZE=blocksize, NB=nb)
    return absmax, bad


def quantize_blockwise_8bit(x: torch.Tensor, offset: torch.Tensor, code: torch.Tensor,
                            blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 absmax per block) of x - offset (offset a 0-d device tensor) with the
    sorted 256-entry map `code`."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    _quant8_kernel[(n_blocks,)](x, offset, code, q, absmax, n, BLOCKSIZE=blocksize)
    return q, absmax
