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


# The rounding table (threshold_table): the sorted float32 thresholds padded with +inf to 16 slots,
# then BUCKETS slots: for each bucket [k/16, (k+1)/16) of the scaled value (k from -16 for NF4's
# signed values, from 0 for FP4's magnitudes) the number of thresholds below its lower edge.
BUCKETS = tl.constexpr(32)


def threshold_table(thresholds: torch.Tensor, signed: bool) -> torch.Tensor:
    """_code_index's table for sorted thresholds in (-1, 1) (signed) or (0, 1). Checked here: no
    bucket of width 1/16 holds two thresholds (NF4's closest pair is 0.08 apart, FP4's 0.083)."""
    t = thresholds.to(torch.float64)
    lo = -16 if signed else 0
    edges = (torch.arange(BUCKETS.value, dtype=torch.float64) + lo) / 16
    below = torch.searchsorted(t, edges, side="left")  # thresholds < each bucket's lower edge
    assert int((torch.searchsorted(t, edges + 1 / 16, side="left") - below).max()) <= 1, "a bucket holds two"
    table = torch.full((16 + BUCKETS.value,), float("inf"), dtype=torch.float32)
    table[: len(t)] = thresholds.float()
    table[16:] = below.float()
    return table


@triton.jit
def _code_index(u, t_ptr, LO: tl.constexpr):
    """Number of the thresholds of threshold_table's table at t_ptr that are < u, ties to the lower
    code: u's bucket (u * 16 floors exactly) holds at most one threshold, so the count below the
    bucket and one comparison decide. NaN falls in a clamped bucket (its code is never kept)."""
    b = tl.minimum(tl.maximum(tl.floor(u * 16.0).to(tl.int32) - LO, 0), BUCKETS - 1)
    cand = gather(tl.load(t_ptr + 16 + tl.arange(0, BUCKETS)), b).to(tl.int32)
    return cand + (u > gather(tl.load(t_ptr + tl.arange(0, 16)), cand)).to(tl.int32)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quant4_kernel(x_ptr, packed_ptr, absmax_ptr, t_ptr, mags_ptr, n, n_bytes, n_blocks,
                   FP4: tl.constexpr, BLOCKSIZE: tl.constexpr, NB: tl.constexpr):
    """NB blocks per program: absmax, then each value's code (NF4: the nearest of 16 codes; FP4: sign
    bit plus the nearest of 8 magnitudes) from the bucket table. The absmax of a block holding NaN
    or Inf is not finite (the max propagates NaN): the caller checks that."""
    rows = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.reduce(tl.abs(x), 1, _max_nan)
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax), 0.0)
    s = x * inv[:, None]
    if FP4:
        mags = tl.load(mags_ptr + tl.arange(0, 8)).to(tl.int32)
        code = gather(mags, _code_index(tl.abs(s), t_ptr, 0)) | ((s < 0).to(tl.int32) << 3)
    else:
        code = _code_index(s, t_ptr, -16)
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
                  out: torch.Tensor) -> torch.Tensor:
    """Codes of x (any float dtype, contiguous) packed two per byte into `out` (uint8, at least
    ceil(n/2) bytes); returns the float32 absmax per block, NaN or Inf where the block holds any.
    `thresholds`: threshold_table's table (on the device) of the 15 NF4 midpoints, or of the 7 FP4
    magnitude thresholds (`mags` the magnitude nibbles between them)."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    nb = max(1, VALUES_PER_PROGRAM // blocksize)
    launch(_quant4_kernel, (cdiv(n_blocks, nb),), x.reshape(-1), out, absmax, thresholds, mags, n, (n + 1) // 2,
           n_blocks, FP4=fp4, BLOCKSIZE=blocksize, NB=nb, num_warps=NUM_WARPS)
    return absmax


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
