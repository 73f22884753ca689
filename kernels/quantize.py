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

from .device import on_tensor_device
from .launch import cdiv, launch
from .lut import gather

VALUES_PER_PROGRAM = 2048  # launch shape, read at launch (scripts/bench_kernels.py --sweep-formats)
NUM_WARPS = 4


@triton.jit
def _count_below(s, t_ptr, STEPS: tl.constexpr):
    """Number of the 2**STEPS - 1 sorted thresholds at t_ptr that are < s (the table is padded with
    +inf to 2**STEPS entries): a binary search of STEPS comparisons, ties to the lower code."""
    table = tl.load(t_ptr + tl.arange(0, 1 << STEPS))
    i = (s > tl.load(t_ptr + (1 << (STEPS - 1)) - 1)).to(tl.int32) << (STEPS - 1)
    for k in tl.static_range(STEPS - 2, -1, -1):
        i += (s > gather(table, i + ((1 << k) - 1))).to(tl.int32) << k
    return i


@triton.jit
def _quant4_kernel(x_ptr, packed_ptr, absmax_ptr, bad_ptr, t_ptr, mags_ptr, n, n_bytes, n_blocks,
                   FP4: tl.constexpr, BLOCKSIZE: tl.constexpr, NB: tl.constexpr):
    """NB blocks per program: absmax, then each value's code (NF4: the nearest of 16 codes; FP4: sign
    bit plus the nearest of 8 magnitudes) by binary search over the rounding thresholds. Non-finite
    inputs are counted (one atomic per program that has any)."""
    rows = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    bad = tl.sum(tl.sum((tl.abs(x) == float("inf")) | (x != x), axis=1).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_add(bad_ptr, bad)
    absmax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax), 0.0)
    s = x * inv[:, None]
    if FP4:
        mags = tl.load(mags_ptr + tl.arange(0, 8)).to(tl.int32)
        code = gather(mags, _count_below(tl.abs(s), t_ptr, 3)) | ((s < 0).to(tl.int32) << 3)
    else:
        code = _count_below(s, t_ptr, 4)
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


@on_tensor_device
def quantize_4bit(x: torch.Tensor, blocksize: int, fp4: bool, thresholds: torch.Tensor, mags: torch.Tensor,
                  out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of x (any float dtype, contiguous) packed two per byte into `out` (uint8, at least
    ceil(n/2) bytes); returns (float32 absmax per block, int32 count of non-finite inputs as a
    1-element device tensor). `thresholds`: a float32 device table of the 15 NF4 midpoints, or the
    7 FP4 magnitude thresholds (`mags` the magnitude nibbles between them), padded with +inf to 16
    or 8 entries."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    bad = torch.zeros(1, dtype=torch.int32, device=x.device)
    nb = max(1, VALUES_PER_PROGRAM // blocksize)
    launch(_quant4_kernel, (cdiv(n_blocks, nb),), x.reshape(-1), out, absmax, bad, thresholds, mags, n,
           (n + 1) // 2, n_blocks, FP4=fp4, BLOCKSIZE=blocksize, NB=nb, num_warps=NUM_WARPS)
    return absmax, bad


@on_tensor_device
def quantize_blockwise_8bit(x: torch.Tensor, offset: torch.Tensor, code: torch.Tensor,
                            blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 absmax per block) of x - offset (offset a 0-d device tensor) with the
    sorted 256-entry map `code`."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    launch(_quant8_kernel, (n_blocks,), x, offset, code, q, absmax, n, BLOCKSIZE=blocksize)
    return q, absmax
