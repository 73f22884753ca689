"""Fused multi-tensor Adam(W) step with blockwise 8-bit (or float32) moments, and its launcher.

One launch updates every tensor of a work list: each program takes a run of 256-value blocks of
one tensor (found through tables of pointers, sizes and state offsets), reads the parameter,
gradient and both moments once, and writes them once. The 8-bit moments live in flat buffers
(codes uint8, one float32 absmax per 256 values); the parameter and gradient pointers come from
tables because each tensor is its own allocation. Imports torch and triton only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from . import launch as launcher
from .lut import gather
from .rounding import TL_DTYPES, to_dtype_rne

BLOCK = 256  # values per absmax block
# Launch shape per parameter dtype: (256-value blocks per program, warps, register cap), from
# scripts/bench_optim.py --sweep on an H100 (kernel times, two runs): float32 params 4 blocks at 64
# registers 1.22 ms (at 72: 1.24, 80: 1.28, 96: 1.32; uncapped, 119 registers and 4 programs per SM:
# 1.45), bfloat16 8 blocks at 80 registers 0.84 ms (96: 0.87, 128: 0.93; uncapped, 213 registers and
# 2 programs per SM: 1.05). The kernel waits on its loads: a cap buys programs per SM, so more loads
# in flight, for a few spills to L1. float16 moves the bytes bfloat16 does. A persistent grid walking
# the work list with loads one item ahead was slower at every shape. The sweep overrides it.
LAUNCH = {torch.float32: (4, 4, 64), torch.bfloat16: (8, 4, 80), torch.float16: (8, 4, 80)}
# Map lookups (codes to values, requantization midpoints) through shared memory (tl.gather of the
# 256-entry table spread over the warps) instead of loads through L1; read at launch, swept.
LUT_SHARED = True


# Where each part of a map table (StateMaps) starts, in float32 slots (constexpr: read by the kernel):
# the 256 codes, their 255 midpoints (+inf last), then the requantization's buckets of |x|: 128 per
# binade (the float's top 7 mantissa bits) over the 32 binades from 2**-31 to [1, 2), each bucket's
# first candidate code, packed four to a 32-bit word.
MIDS, CAND = tl.constexpr(256), tl.constexpr(512)
N_BUCKETS, BUCKET_BASE = tl.constexpr(4096), tl.constexpr((127 - 31) << 7)
TABLE = 512 + 1024


@triton.jit
def _lookup(table_ptr, idx, SHARED: tl.constexpr, SIZE: tl.constexpr = 256):
    """table_ptr[idx] for int32 indices in [0, SIZE): a gather from the table in shared memory (a
    few bank conflicts per warp; the values keep their layout), or a load through L1 (one
    wavefront per cache line; Triton may give such loads a layout of their own, and convert)."""
    if SHARED:
        table = tl.load(table_ptr + tl.arange(0, SIZE))
        return gather(table, idx)
    return tl.load(table_ptr + idx)


@triton.jit
def _magnitude_index(ax, map_ptr, SHARED: tl.constexpr):
    """Index of the nearest entry of the map's non-negative half to ax >= 0, ties to the smaller:
    127..255 (signed map) or 0..255 (unsigned). No bucket of |x| holds more than one midpoint of
    the map (checked when the table is built), so the bucket's first candidate or the code after
    it is the nearest, and the candidate's upper midpoint settles it. (Measured on an H100 against
    the decade arithmetic it replaced: 1.45 vs 1.49 ms fp32, 1.06 vs 1.15 ms bf16 per step.)"""
    b = tl.minimum(tl.maximum((ax.to(tl.int32, bitcast=True) >> 16) - BUCKET_BASE, 0), N_BUCKETS - 1)
    word = _lookup(map_ptr + CAND, b >> 2, SHARED, N_BUCKETS // 4).to(tl.int32, bitcast=True)
    guess = (word >> ((b & 3) * 8)) & 255
    return guess + (ax > _lookup(map_ptr + MIDS, guess, SHARED)).to(tl.int32)


@triton.jit
def _quantize_rows(s, absmax, map_ptr, SIGNED: tl.constexpr, SHARED: tl.constexpr):
    """uint8 codes of the rows of s scaled by their absmax; the negative half mirrors the positive
    one (ties to the smaller magnitude), and a negative first moment never rounds to +0."""
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax), 0.0)
    x = s * inv[:, None]
    idx = _magnitude_index(tl.abs(x) if SIGNED else x, map_ptr, SHARED)  # the second moment is >= 0
    if SIGNED:  # mirrored: 127 + i -> 127 - i, but 127 (zero) -> 126 and 255 (one) -> 0
        idx = tl.where(x < 0, tl.minimum(tl.maximum(254 - idx, 0), 126), idx)
    return idx.to(tl.uint8)


@triton.jit
def _load(ptr, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=other)
    return tl.load(ptr)


@triton.jit
def _adam_tile(p_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, map1_ptr, map2_ptr,
               first, numel, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, l2, step_size, eps_hat,
               P_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
               MASKED: tl.constexpr, SHARED: tl.constexpr, NB: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """NB blocks of one tensor from block `first`; pointers already point at the tensor's element
    0 (state pointers at its segment, absmax pointers at its first block). Unmasked (vectorized)
    unless MASKED, for the tensor's last, partial run of blocks."""
    rows = first + tl.arange(0, NB)
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    if MASKED:
        mask = offs < numel
        row_mask = rows * BLOCK_SIZE < numel
    else:
        mask = None
        row_mask = None
    p = _load(p_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
    g = _load(g_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
    if USE_L2:
        g = g + l2 * p
    finite = tl.abs(g) < float("inf")  # false for NaN too
    if MASKED:
        finite = finite & mask
    g = tl.where(finite, g, 0.0)
    if EIGHT_BIT:
        a1 = _load(a1_ptr + rows, row_mask, 0.0, MASKED)
        a2 = _load(a2_ptr + rows, row_mask, 0.0, MASKED)
        c1 = _load(s1_ptr + offs, mask, 127, MASKED).to(tl.int32)
        c2 = _load(s2_ptr + offs, mask, 0, MASKED).to(tl.int32)
        s1 = _lookup(map1_ptr, c1, SHARED) * a1[:, None]
        s2 = _lookup(map2_ptr, c2, SHARED) * a2[:, None]
    else:
        s1 = _load(s1_ptr + offs, mask, 0.0, MASKED)
        s2 = _load(s2_ptr + offs, mask, 0.0, MASKED)
    s1 = tl.where(finite, s1 * beta1 + one_minus_beta1 * g, 0.0)
    s2 = tl.where(finite, s2 * beta2 + one_minus_beta2 * g * g, 0.0)
    new = p + step_size * (s1 / (tl.sqrt(s2) + eps_hat))
    if USE_DECAY:
        new = new * decay
    tl.store(p_ptr + offs, to_dtype_rne(tl.where(finite, new, p), P_DTYPE), mask=mask)
    if EIGHT_BIT:
        n1 = tl.max(tl.abs(s1), axis=1)
        n2 = tl.max(tl.abs(s2), axis=1)
        tl.store(s1_ptr + offs, _quantize_rows(s1, n1, map1_ptr, True, SHARED), mask=mask)
        tl.store(s2_ptr + offs, _quantize_rows(s2, n2, map2_ptr, False, SHARED), mask=mask)
        tl.store(a1_ptr + rows, n1, mask=row_mask)
        tl.store(a2_ptr + rows, n2, mask=row_mask)
    else:
        tl.store(s1_ptr + offs, s1, mask=mask)
        tl.store(s2_ptr + offs, s2, mask=mask)


@triton.jit
def _adam_kernel(work_ptr, p_base, poff_ptr, goff_ptr, numel_ptr, elem_off_ptr, block_off_ptr, scal_ptr,
                 s1_ptr, s2_ptr, a1_ptr, a2_ptr, map1_ptr, map2_ptr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, decay, l2, step_size, eps_hat,
                 P_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                 PER_TENSOR_STEP: tl.constexpr, ALIGN: tl.constexpr, SHARED: tl.constexpr, NB: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr):
    w = tl.program_id(0)
    slot = tl.load(work_ptr + 2 * w)
    first = tl.load(work_ptr + 2 * w + 1).to(tl.int64)
    # Tensors are addressed from one base pointer by element offsets, multiples of ALIGN elements
    # (16 bytes when the host found them so): that lets loads and stores be vectorized.
    p_ptr = p_base + tl.multiple_of(tl.load(poff_ptr + slot), ALIGN)
    g_ptr = p_base + tl.multiple_of(tl.load(goff_ptr + slot), ALIGN)
    numel = tl.load(numel_ptr + slot)
    elem_off = tl.multiple_of(tl.load(elem_off_ptr + slot), 16)
    block_off = tl.load(block_off_ptr + slot)
    if PER_TENSOR_STEP:  # tensors at different steps: bias corrections from the table
        step_size = tl.load(scal_ptr + 2 * slot)
        eps_hat = tl.load(scal_ptr + 2 * slot + 1)
    if (first + NB) * BLOCK_SIZE <= numel:
        _adam_tile(p_ptr, g_ptr, s1_ptr + elem_off, s2_ptr + elem_off, a1_ptr + block_off, a2_ptr + block_off,
                   map1_ptr, map2_ptr, first, numel, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, l2,
                   step_size, eps_hat, P_DTYPE, EIGHT_BIT, USE_L2, USE_DECAY, False, SHARED, NB, BLOCK_SIZE)
    else:
        _adam_tile(p_ptr, g_ptr, s1_ptr + elem_off, s2_ptr + elem_off, a1_ptr + block_off, a2_ptr + block_off,
                   map1_ptr, map2_ptr, first, numel, beta1, beta2, one_minus_beta1, one_minus_beta2, decay, l2,
                   step_size, eps_hat, P_DTYPE, EIGHT_BIT, USE_L2, USE_DECAY, True, SHARED, NB, BLOCK_SIZE)


class StateMaps(NamedTuple):
    """Each 8-bit map as one float32 table on the device: codes, midpoints, then the buckets of
    _magnitude_index, laid out as MIDS and CAND say."""

    table1: torch.Tensor  # signed
    table2: torch.Tensor  # unsigned

    @classmethod
    def build(cls, signed: torch.Tensor, unsigned: torch.Tensor, device: torch.device) -> StateMaps:
        """From the two sorted float32 maps (256 values each)."""
        return cls(_map_table(signed, True).to(device), _map_table(unsigned, False).to(device))


def _map_table(code: torch.Tensor, signed: bool) -> torch.Tensor:
    """The table of one map (StateMaps)."""
    mids = (code[:-1] + code[1:]) * 0.5  # float32, as the reference computes them
    table = torch.full((TABLE,), float("inf"), dtype=torch.float32)
    table[:256], table[MIDS.value:MIDS.value + 255] = code, mids
    table[CAND.value:] = _bucket_words(mids, 127 if signed else 0).view(torch.float32)
    return table


def _bucket_words(mids: torch.Tensor, zero: int) -> torch.Tensor:
    """_magnitude_index's table: for each bucket of |x| the index of the nearest code at its lower
    end (the zero code plus the half's midpoints below it), four uint8 to an int32 word. Buckets
    below the first clamp to it and those above the last to it, so the first spans [0, ...) and
    the last [..., inf)."""
    half = mids[zero:]  # float32 midpoints of the non-negative half, ascending (then +inf: index 255)
    first, n = (BUCKET_BASE.value, N_BUCKETS.value)
    lo = (torch.arange(first, first + n, dtype=torch.int32) << 16).view(torch.float32)
    below = torch.searchsorted(half, lo, side="left")  # midpoints < lo
    below[0] = 0
    upto = torch.cat([below[1:], torch.tensor([len(half)])])  # midpoints < the next bucket's lo
    assert int((upto - below).max()) <= 1, "a bucket holds two midpoints"
    cand = (zero + below).to(torch.int32)
    assert int(cand.max()) <= 255
    packed = cand.view(-1, 4) << torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    return packed.sum(1, dtype=torch.int64).to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32)


def work_list(numels: list[int], device: torch.device, blocks_per_program: int) -> torch.Tensor:
    """int32 (n_programs, 2): (tensor slot, first block) for runs of `blocks_per_program` blocks (the
    launch's first LAUNCH number)."""
    items = [(slot, b) for slot, n in enumerate(numels) for b in range(0, -(-n // BLOCK), blocks_per_program)]
    return torch.tensor(items, dtype=torch.int32, device=device).reshape(-1, 2)


def element_offsets(addrs: list[int], base: int, itemsize: int) -> tuple[list[int], int]:
    """Offsets of tensors at `addrs` from `base`, in elements, and the largest alignment (in
    elements, up to 16 bytes) that all of them and the base share, for the kernel's ALIGN."""
    align = 16
    for a in [base, *addrs]:
        while a % align:
            align //= 2
    return [(a - base) // itemsize for a in addrs], max(align // itemsize, 1)


@on_tensor_device
def adam_step(work: torch.Tensor, p_base: torch.Tensor, p_offs: torch.Tensor, g_offs: torch.Tensor, align: int,
              numels: torch.Tensor, elem_offs: torch.Tensor, block_offs: torch.Tensor,
              scalars: torch.Tensor | tuple[float, float], state1: torch.Tensor, state2: torch.Tensor,
              absmax1: torch.Tensor | None, absmax2: torch.Tensor | None, maps: StateMaps, *, beta1: float,
              beta2: float, decay: float, l2: float, launch: tuple[int, ...]) -> None:
    """Launch one step over a work list. Parameters and gradients are contiguous tensors of
    p_base's dtype at element offsets p_offs / g_offs (int64 device tables, from
    `element_offsets`, all multiples of `align`) from p_base. Other tables, indexed by slot:
    numels, elem_offs (into state1/state2; multiples of 16), block_offs (into absmax1/absmax2).
    `scalars`: (step_size, eps_hat) shared by all tensors, or a float32 (n, 2) device table of
    them. 8-bit when absmax1 is given (uint8 states), else float32 states. `decay` multiplies the
    parameter after the update (AdamW; 1.0 for none); `l2` times the parameter is added to the
    gradient (Adam). `launch`: (blocks per program, warps[, register cap]), the blocks as the work
    list was made with."""
    eight_bit = absmax1 is not None
    per_tensor = isinstance(scalars, torch.Tensor)
    dummy = state1 if eight_bit else maps.table1
    step_size, eps_hat = (0.0, 0.0) if per_tensor else scalars
    # Of the arguments only p_base's address can change how Triton specializes the kernel (every other
    # tensor is an allocation of this module's callers, aligned; the floats are floats), so its
    # 16-byte alignment is the cached launch's key.
    launcher.launch(
        _adam_kernel, (work.shape[0],), work, p_base, p_offs, g_offs, numels, elem_offs, block_offs,
        scalars if per_tensor else maps.table1, state1, state2, absmax1 if eight_bit else dummy,
        absmax2 if eight_bit else dummy, maps.table1, maps.table2, beta1, beta2, 1.0 - beta1, 1.0 - beta2, decay, l2,
        step_size, eps_hat, num_warps=launch[1], maxnreg=launch[2] if len(launch) > 2 else None,
        key=(p_base.data_ptr() % 16 == 0,), P_DTYPE=TL_DTYPES[p_base.dtype], EIGHT_BIT=eight_bit, USE_L2=l2 != 0.0,
        USE_DECAY=decay != 1.0, PER_TENSOR_STEP=per_tensor, ALIGN=align, SHARED=LUT_SHARED, NB=launch[0],
        BLOCK_SIZE=BLOCK)
