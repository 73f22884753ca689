"""Fused dequantize-matmul with a packed 4-bit weight W (N x K, bitsandbytes' layout): the forward
Y = X @ deq(W)^T (+ bias) and the input gradient dX = dY @ deq(W), and their launchers. Imports
torch and triton only.

The tiled forward walks K in groups of NBLK absmax blocks (split over SPLIT_K programs for few rows),
looking the nibbles up in the 16-entry code table; in 16 bits it computes Y^T instead, with the
codes decoded in registers as the MMA's register operand (nibbles.decode) and X's columns put in
the order of the bytes that feed them (_x_order_kernel, a copy of X). The input gradient walks N
one block of W's rows at a time, and a CUDA-core GEMV serves a single row (split over K, the row of
X held in registers). Each reads a block's packed bytes once and applies the block's absmax (decoded
from its nested 8-bit code when double-quantized) to the block's partial product or to the codes.
Needs K % blocksize == 0 and blocksize <= 256; callers fall back to dequantize + cuBLAS otherwise
and where that is faster. On sm_90, 2 to 256 rows of 16-bit X go to matmul4bit_tma's Gluon kernels
(LUT kinds 6 and 5) where they take them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .device import on_tensor_device
from .launch import Plan, cdiv, launch, next_power_of_2, recall, remember, stream
from . import matmul4bit_tma, nibbles
from .lut import gather
from .rounding import TL_DTYPES, to_dtype_rne

MAX_BLOCKSIZE = 256
# Rows of X (dY) up to which the fused kernel beats dequantize + cuBLAS, from scripts/bench_kernels.py
# --sweep on an H100 (13824x5120, bf16): forward with split-K 68/69/77/93 us at M=1/16/32/64 vs
# 138 us; slower from M=128 (153 vs 139); the input-gradient kernel is slower at every M (283 vs
# 140 us at M=1), so it is not dispatched. A later sweep with the byte-pair lookup (kind 2): 59/60/74
# us at M=1/16/64 against 126-136 us for dequantize + cuBLAS. With the codes decoded in registers
# (16-bit X on sm_80+, FWD_MAX_M_REGS; CUDA-graph timings, one H100): 88 us at M=256 (+2.4 for X's
# column order) against 129 for dequantize + cuBLAS; two tiles of 256 rows would decode W twice.
FWD_MAX_M = 64
FWD_MAX_M_REGS = 256
BWD_MAX_M = 0
# The CUDA-core GEMV for a single row: program (n, k) holds X's values of the k-th run of NB absmax
# blocks in registers and walks ROWS * STEPS rows of W. On one H100 (--sweep --sweep-gemv-m 1): 35.1 us
# with 2 rows per step, 8 steps, 16 blocks and 1 warp (kind 3), 37.5 us for the next shapes; the
# earlier GEMV (rows of W across the program, K walked in steps) took 37.7-38.9 us, 52.1 with kind 0.
GEMV_MAX_M = 1
# In 16 bits the codes are decoded in registers as the MMA's register operand (LUT kind 4,
# _fwd_regs_kernel), X's columns put in the kernel's order first (_x_order_kernel, 1.4-2.4 us). One
# H100, CUDA-graph timings of a throwaway sweep (kernel, then X's order): M=16 29.9 + 1.4 us against
# 32.6 with X gathered in the kernel; M=32 35.3 + 1.5 against 40.4; M=64 44.8 + 1.6 against 66.7 for
# kind 2; M=128 72.0 + 1.9 and M=256 88.1 + 2.4 (absmax folded into the codes) against 120 and 129
# for dequantize + cuBLAS. _lookup_config serves where kind 4 does not run (Triton's interpreter,
# sm_75, a code table first read during CUDA graph capture). Each step's absmax (a byte per row of W,
# which Triton does not pipeline, and its nested lookup) is loaded a step ahead: flushed CUDA graphs,
# one H100, M=64 47.0-47.8 us against 49.8-50.4 (4 stages: 47.0), M=128 74.4 against 78.0; M=16 the same.
# At M=32 split 3 took 39.5 us against 42.3-42.5 for split 2 (split 4: 44.1); register caps (maxnreg 64-112)
# were slower at M=16 and 32, and split 5, 6 or 8 at M=16 no faster than 4 (34.5-38.5 against 34.5-35.2).
X_ORDER_BLOCK = 1024
GEMV_CONFIG = (2, 8, 16, 1, 3)  # ROWS, STEPS, NB, num_warps, LUT kind (_lookup)


@triton.jit
def _absmax(stored, blk, mask, nested_absmax_ptr, nested_code_ptr, offset, NESTED: tl.constexpr):
    """float32 absmax of blocks `blk` from their stored values (nested: code[q] * nested_absmax +
    offset, as the reference decodes it; else already float32)."""
    return _scale_absmax(stored, _nested_absmax(blk, mask, nested_absmax_ptr, NESTED), nested_code_ptr, offset, NESTED)


@triton.jit
def _nested_absmax(blk, mask, nested_absmax_ptr, NESTED: tl.constexpr):
    """The nested absmax over blocks `blk` (one per 256 blocks); 0 when not double-quantized."""
    return tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0) if NESTED else 0.0


@triton.jit
def _scale_absmax(stored, nested, nested_code_ptr, offset, NESTED: tl.constexpr):
    """_absmax from the stored values and their nested absmax."""
    if NESTED:
        am = tl.load(nested_code_ptr + stored.to(tl.int32)) * nested + offset
    else:
        am = stored
    return am


@triton.jit
def _table(code_ptr, COLS: tl.constexpr, AXIS: tl.constexpr, DOT: tl.constexpr):
    """The 16 code values in registers, repeated along the other axis for tl.gather."""
    t = tl.load(code_ptr + tl.arange(0, 16)).to(DOT)
    if AXIS == 0:
        table = tl.broadcast_to(t[:, None], (16, COLS))
    else:
        table = tl.broadcast_to(t[None, :], (COLS, 16))
    return table


@triton.jit
def _codes(table, byte, AXIS: tl.constexpr):
    """The two values of each byte (high nibble first) in the table's dtype, unscaled: a lookup in
    registers, not a gather from memory (which Triton's pipeliner would turn into 4-byte copies)."""
    byte = byte.to(tl.int32)
    return tl.gather(table, byte >> 4, AXIS), tl.gather(table, byte & 15, AXIS)


@triton.jit
def _pair_table(code_ptr, DOT: tl.constexpr):
    """For each of the 256 byte values its two code values (high nibble, low nibble) in DOT, packed
    into one integer (int32 for 16-bit DOT, int64 for float32): one shared-memory gather per byte."""
    b = tl.arange(0, 256)
    hi, lo = tl.load(code_ptr + (b >> 4)).to(DOT), tl.load(code_ptr + (b & 15)).to(DOT)
    if DOT == tl.float32:
        pairs = (hi.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (lo.to(tl.int32, bitcast=True).to(tl.int64)
                                                                    & 0xFFFFFFFF)
    else:
        pairs = (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) | (lo.to(tl.int16, bitcast=True).to(tl.int32)
                                                                    & 0xFFFF)
    return pairs


@triton.jit
def _code_table(code_ptr, COLS: tl.constexpr, AXIS: tl.constexpr, LUT: tl.constexpr, DOT: tl.constexpr):
    """What _lookup reads for LUT kind 0 (registers), 2 (byte pairs) or 3 (the 16 float32 codes);
    kind 1 reads code_ptr itself."""
    if LUT == 2:
        table = _pair_table(code_ptr, DOT)
    elif LUT == 3:
        table = tl.load(code_ptr + tl.arange(0, 16))
    else:
        table = _table(code_ptr, COLS, AXIS, DOT)
    return table


@triton.jit
def _lookup(code_ptr, table, byte, AXIS: tl.constexpr, LUT: tl.constexpr, DOT: tl.constexpr):
    """The two values of each byte, by LUT kind: 0 from the 16-entry table in registers (shuffles),
    1 from the 64-byte code table through L1 (kernels launched unpipelined, so the lookups stay
    loads), 2 from the 256-entry table of byte pairs gathered from shared memory (one read per byte),
    3 from the 16 float32 codes gathered per nibble (16 words in 16 banks: no bank conflicts)."""
    if LUT == 1:
        b = byte.to(tl.int32)
        hi, lo = tl.load(code_ptr + (b >> 4)).to(DOT), tl.load(code_ptr + (b & 15)).to(DOT)
    elif LUT == 3:  # one gather for both nibbles: Triton stores the table and syncs at every gather
        b = byte.to(tl.int32)
        hi, lo = tl.split(gather(table, tl.join(b >> 4, b & 15)).to(DOT))
    elif LUT == 2:
        w = gather(table, byte.to(tl.int32))
        if DOT == tl.float32:
            hi, lo = (w >> 32).to(tl.int32).to(DOT, bitcast=True), w.to(tl.int32).to(DOT, bitcast=True)
        else:
            hi, lo = (w >> 16).to(tl.int16).to(DOT, bitcast=True), w.to(tl.int16).to(DOT, bitcast=True)
    else:
        hi, lo = _codes(table, byte, AXIS)
    return hi, lo


@triton.jit
def _store_rows(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, HAS_BIAS: tl.constexpr):
    """acc (+ bias) rounded to the output's dtype, rows rm and columns rn."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, to_dtype_rne(acc, y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _finish_tile(acc, bias_ptr, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the (BLOCK_M, BLOCK_N) tile of Y, or with SPLIT_K > 1 write this program's float32 partial
    (program (n, m, k)) to the workspace (SPLIT_K, M, N), and the last program of the tile stores the
    sum (_sum_partials)."""
    m_mask, n_mask = rm < M, rn < N
    if SPLIT_K == 1:
        _store_rows(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, HAS_BIAS)
    else:
        ws = ws_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tile_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(ws + tl.program_id(2).to(tl.int64) * M * N, acc, mask=tile_mask)
        last, total = _sum_partials(ws, tile_mask, lock_ptr + tl.program_id(1) * tl.num_programs(0) +
                                    tl.program_id(0), M * N, SPLIT_K)
        if last:
            _store_rows(total, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, HAS_BIAS)


@triton.jit
def _sum_partials(ws, mask, lock, k_stride, SPLIT_K: tl.constexpr):
    """Count this program in its tile's lock once its partials are written (the tile's SPLIT_K
    partials at ws, k_stride apart). The last to arrive gets (True, their sum in a fixed order: the
    result does not depend on who is last) and resets the lock for the next launch; others (False,
    zeros)."""
    tl.debug_barrier()  # every thread's partial is written before the count (released at GPU scope)
    last = tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1
    total = tl.zeros(ws.shape, tl.float32)
    if last:
        for k in range(SPLIT_K):
            total += tl.load(ws + k * k_stride, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(lock, 0)
    return last, total


@triton.jit
def _fwd_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
                y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                BS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, LUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr, NBLK: tl.constexpr):
    """Each iteration takes NBLK absmax blocks of K (NBLK > 1: longer contiguous byte loads per row;
    the weights are scaled by their absmax and rounded to the compute dtype before the dot, as
    dequantize + matmul does; NBLK = 1 scales the float32 partial product instead). The launcher makes
    every run a whole number of NBLK-block groups.

    SPLIT_K > 1: program (n, m, k) walks the k-th of SPLIT_K runs of absmax blocks (more programs
    and more bytes in flight when M is small); _finish_tile sums the partials."""
    pid_n = tl.program_id(0)  # N fastest: programs that share X run together
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, NBLK * BS // 2)
    g = tl.arange(0, NBLK)
    m_mask, n_mask = rm < M, rn < N
    blocks_per_row = K // BS
    per = tl.cdiv(tl.cdiv(blocks_per_row, SPLIT_K), NBLK) * NBLK
    kb0 = pid_k * per
    kb1 = tl.minimum(kb0 + per, blocks_per_row)
    last = tl.maximum(kb1 - NBLK, 0)  # an empty run (kb0 >= kb1) loads group `last` and adds nothing
    x_offs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + tl.arange(0, NBLK * BS)[None, :]
    w_cols = rn.to(tl.int64)[None, :] * stride_wn + h[:, None]  # (NBLK * BS/2, BLOCK_N) byte offsets
    blk = rn.to(tl.int64)[None, :] * blocks_per_row + g[:, None]  # (NBLK, BLOCK_N) absmax indices
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    LUT_DT: tl.constexpr = DOT if NBLK == 1 else tl.float32  # codes scaled in float32 first when NBLK > 1
    table = _code_table(code_ptr, BLOCK_N, 0, LUT, LUT_DT)
    # Every global load of group kb + NBLK is issued before group kb computes (one group of lookahead).
    k_first = tl.minimum(kb0, last)
    byte = tl.load(packed_ptr + w_cols + k_first * (BS // 2), mask=n_mask[None, :], other=0)
    xv = tl.load(x_offs + k_first * BS, mask=m_mask[:, None], other=0.0)
    stored = tl.load(absmax_ptr + blk + k_first, mask=n_mask[None, :], other=0)
    for kb in range(kb0, kb1, NBLK):
        kn = tl.minimum(kb + NBLK, last)
        byte_n = tl.load(packed_ptr + w_cols + kn * (BS // 2), mask=n_mask[None, :], other=0)
        xv_n = tl.load(x_offs + kn * BS, mask=m_mask[:, None], other=0.0)
        stored_n = tl.load(absmax_ptr + blk + kn, mask=n_mask[None, :], other=0)
        xe, xo = tl.split(xv.reshape(BLOCK_M, NBLK * BS // 2, 2))  # even and odd columns of X
        hi, lo = _lookup(code_ptr, table, byte, 0, LUT, LUT_DT)
        am = _absmax(stored, blk + kb, n_mask[None, :], nested_absmax_ptr, nested_code_ptr, offset, NESTED)
        if NBLK == 1:
            part = tl.dot(xe.to(DOT), hi, input_precision=PRECISION)
            part = tl.dot(xo.to(DOT), lo, part, input_precision=PRECISION)
            acc += part * tl.sum(am, axis=0)[None, :]
        else:
            scale = tl.broadcast_to(am[:, None, :], (NBLK, BS // 2, BLOCK_N)).reshape(NBLK * BS // 2, BLOCK_N)
            acc = tl.dot(xe.to(DOT), (hi * scale).to(DOT), acc, input_precision=PRECISION)
            acc = tl.dot(xo.to(DOT), (lo * scale).to(DOT), acc, input_precision=PRECISION)
        byte, xv, stored = byte_n, xv_n, stored_n
    _finish_tile(acc, bias_ptr, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, stride_ym, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _fwd_regs_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
                     y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     BS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, DECODE: tl.constexpr,
                     DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                     PDL: tl.constexpr):
    """16-bit X: Y^T = deq(W) X^T, W's rows as the MMA's M dimension, so the codes are the operand
    held in registers and each thread decodes its own bytes (nibbles.decode). Byte (R/4) t + 2c + s
    of a block's R = BS/2 bytes feeds k pair 8c + 4s + t: the k pairs a thread holds in the MMA
    fragment are contiguous bytes, and X comes with its columns in that order (_x_order_kernel), so
    its tiles load whole. One absmax block per step: up to 64 columns of X^T its float32 partial is
    scaled by the absmax; wider tiles fold the absmax into the codes instead (the accumulator would
    not fit twice), rounding deq(W) to 16 bits as dequantize + cuBLAS does. The absmax is loaded a
    step ahead of its use. Split-K and the store as in _fwd_kernel. PDL: launched while _x_order_kernel
    runs (programmatic dependent launch), it waits for that kernel's X first."""
    if PDL:
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = rn < N, rm < M
    R: tl.constexpr = BS // 2
    blocks_per_row = K // BS
    per = tl.cdiv(blocks_per_row, SPLIT_K)
    kb0 = pid_k * per
    kb1 = tl.minimum(kb0 + per, blocks_per_row)
    x_cols = x_ptr + rm[None, :] * stride_xm + tl.arange(0, BS)[:, None]
    w_rows = packed_ptr + rn.to(tl.int64)[:, None] * stride_wn + tl.arange(0, R)[None, :]
    blk = rn.to(tl.int64) * blocks_per_row
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    # A step's absmax loads are issued a step ahead: Triton does not pipeline them (a byte per row)
    last = tl.maximum(kb1 - 1, 0)
    k_first = tl.minimum(kb0, last)  # an empty run (kb0 >= kb1) loads block `last` and uses nothing
    stored = tl.load(absmax_ptr + blk + k_first, mask=n_mask, other=0)
    nested = _nested_absmax(blk + k_first, n_mask, nested_absmax_ptr, NESTED)
    for kb in range(kb0, kb1):
        kn = tl.minimum(kb + 1, last)
        stored_n = tl.load(absmax_ptr + blk + kn, mask=n_mask, other=0)
        nested_n = _nested_absmax(blk + kn, n_mask, nested_absmax_ptr, NESTED)
        xv = tl.load(x_cols + kb * BS, mask=m_mask[None, :], other=0.0)
        byte = tl.load(w_rows + kb * R, mask=n_mask[:, None], other=0)
        byte = byte.reshape(BLOCK_N, 4, R // 8, 2).permute(0, 2, 3, 1).reshape(BLOCK_N, R)  # k pair order
        hi, lo = nibbles.decode(byte, DECODE, DOT)
        am = _scale_absmax(stored, nested, nested_code_ptr, offset, NESTED)
        if BLOCK_M > 64:
            scale = am.to(DOT)[:, None]
            acc = tl.dot(tl.join(hi * scale, lo * scale).reshape(BLOCK_N, BS), xv, acc)
        else:
            acc += tl.dot(tl.join(hi, lo).reshape(BLOCK_N, BS), xv) * am[:, None]
        stored, nested = stored_n, nested_n
    _finish_tile(tl.trans(acc), bias_ptr, y_ptr, ws_ptr, lock_ptr, rm, rn, M, N, stride_ym, HAS_BIAS, SPLIT_K,
                 BLOCK_M, BLOCK_N)


@triton.jit
def _x_order_kernel(x_ptr, out_ptr, K, stride_xm, R: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[m] = row m of X with each absmax block's columns in _fwd_regs_kernel's k pair order: pair p
    of a block of R pairs from pair (R/4)(p % 4) + 2(p // 8) + (p // 4) % 2. PDL: the matmul after it
    may launch at once."""
    if PDL:
        gdc_launch_dependents()
    m = tl.program_id(1).to(tl.int64)
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p = (k // 2) % R
    src = k + 2 * ((R // 4) * (p % 4) + 2 * (p // 8) + (p // 4) % 2 - p)
    tl.store(out_ptr + m * K + k, tl.load(x_ptr + m * stride_xm + src, mask=k < K), mask=k < K)


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
                 y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, LUT: tl.constexpr,
                 ROWS: tl.constexpr, STEPS: tl.constexpr, NB: tl.constexpr, SPLIT_K: tl.constexpr):
    """One row of X on CUDA cores. Program (n, k, m) holds row m's values of the k-th run of NB absmax
    blocks in registers and walks ROWS * STEPS rows of W against them, ROWS per step (its packed
    bytes read once, 16 per thread), float32 throughout; each row's dot over a block is scaled by the
    block's absmax once. The SPLIT_K partials meet as in _finish_tile: written to the workspace, summed
    in a fixed order by the last program of the row group to arrive. (This epilogue is its own rather
    than _sum_partials: with that helper the kernel took 29.0 us at M=1 against 26.5, CUDA graphs on
    an H100, though the main loop compiled the same.)"""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    g = tl.arange(0, NB)
    col = pid_k * (NB * BS // 2) + tl.arange(0, NB * BS // 2)  # byte columns of W (a row's bytes: one load)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm + 2 * col
    xe, xo = tl.load(x_row).to(tl.float32), tl.load(x_row + 1).to(tl.float32)  # X's columns of each byte
    table = _code_table(code_ptr, 1, 0, LUT, tl.float32)
    offset = tl.load(offset_ptr) if NESTED else 0.0
    rows = pid_n * (ROWS * STEPS) + tl.arange(0, ROWS)
    w_bytes = packed_ptr + rows.to(tl.int64)[:, None] * stride_wn + col[None, :]
    blk = rows.to(tl.int64)[:, None] * (K // BS) + pid_k * NB + g[None, :]  # (ROWS, NB)
    ws = ws_ptr + (pid_k * M + pid_m).to(tl.int64) * N
    # Every global load of step s + 1 is issued before step s computes (the last step reloads itself).
    byte = tl.load(w_bytes, mask=(rows < N)[:, None], other=0)
    stored = tl.load(absmax_ptr + blk, mask=(rows < N)[:, None], other=0)
    for s in range(STEPS):
        sn = tl.minimum(s + 1, STEPS - 1) * ROWS
        byte_n = tl.load(w_bytes + sn * stride_wn, mask=(rows + sn < N)[:, None], other=0)
        stored_n = tl.load(absmax_ptr + blk + sn * (K // BS), mask=(rows + sn < N)[:, None], other=0)
        hi, lo = _lookup(code_ptr, table, byte, 1, LUT, tl.float32)  # (ROWS, NB * BS/2)
        prod = hi * xe[None, :] + lo * xo[None, :]
        part = tl.sum(prod.reshape(ROWS, NB, BS // 2), axis=2)  # (ROWS, NB): per absmax block
        am = _absmax(stored, blk + s * ROWS * (K // BS), (rows + s * ROWS < N)[:, None], nested_absmax_ptr,
                     nested_code_ptr, offset, NESTED)
        dot = tl.sum(part * am, axis=1)
        rn = rows + s * ROWS
        if SPLIT_K == 1:
            _store_rows(dot[None, :], bias_ptr, y_ptr + pid_m.to(tl.int64) * stride_ym, tl.zeros((1,), tl.int32), rn,
                        tl.full((1,), 1, tl.int1), rn < N, 0, HAS_BIAS)
        else:
            tl.store(ws + rn, dot, mask=rn < N)
        byte, stored = byte_n, stored_n
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partials are written before the count (released at GPU scope)
        lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:
            span = pid_n * (ROWS * STEPS) + tl.arange(0, ROWS * STEPS)
            total = tl.zeros((ROWS * STEPS,), tl.float32)
            for k in range(SPLIT_K):
                total += tl.load(ws_ptr + (k * M + pid_m).to(tl.int64) * N + span, mask=span < N, other=0.0,
                                 cache_modifier=".cg")
            _store_rows(total[None, :], bias_ptr, y_ptr + pid_m.to(tl.int64) * stride_ym, tl.zeros((1,), tl.int32),
                        span, tl.full((1,), 1, tl.int1), span < N, 0, HAS_BIAS)
            tl.atomic_xchg(lock, 0)


@triton.jit
def _bwd_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, dx_ptr,
                M, N, K, stride_dym, stride_dxm,
                BS: tl.constexpr, NESTED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kb = tl.program_id(0)  # one absmax block of columns of W
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    h = tl.arange(0, BS // 2)
    blocks_per_row = K // BS
    acc_e = tl.zeros((BLOCK_M, BS // 2), tl.float32)
    acc_o = tl.zeros((BLOCK_M, BS // 2), tl.float32)
    table = _table(code_ptr, BLOCK_N, 1, DOT)
    offset = tl.load(offset_ptr) if NESTED else 0.0
    r = tl.arange(0, BLOCK_N)
    w_rows = r.to(tl.int64)[:, None] * (K // 2) + kb * (BS // 2) + h[None, :]
    dy_offs = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + r[None, :]
    # Every global load of the next BLOCK_N rows is issued before these compute.
    byte = tl.load(packed_ptr + w_rows, mask=r[:, None] < N, other=0)
    dyv = tl.load(dy_offs, mask=m_mask[:, None] & (r < N)[None, :], other=0.0)
    stored = tl.load(absmax_ptr + r.to(tl.int64) * blocks_per_row + kb, mask=r < N, other=0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + r
        n_mask = rn < N
        nn = rn + BLOCK_N
        byte_n = tl.load(packed_ptr + w_rows + (n0 + BLOCK_N) * (K // 2), mask=(nn < N)[:, None], other=0)
        dyv_n = tl.load(dy_offs + n0 + BLOCK_N, mask=m_mask[:, None] & (nn < N)[None, :], other=0.0)
        stored_n = tl.load(absmax_ptr + nn.to(tl.int64) * blocks_per_row + kb, mask=nn < N, other=0)
        am = _absmax(stored, rn.to(tl.int64) * blocks_per_row + kb, n_mask, nested_absmax_ptr, nested_code_ptr, offset,
                     NESTED)
        dy = (dyv.to(tl.float32) * am[None, :]).to(DOT)  # the absmax scales W's rows: fold it into dY's columns
        hi, lo = _codes(table, byte, 1)
        byte, dyv, stored = byte_n, dyv_n, stored_n
        acc_e = tl.dot(dy, hi, acc_e, input_precision=PRECISION)
        acc_o = tl.dot(dy, lo, acc_o, input_precision=PRECISION)
    dx = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + kb * BS + 2 * h[None, :]
    tl.store(dx, to_dtype_rne(acc_e, dx_ptr.dtype.element_ty), mask=m_mask[:, None])
    tl.store(dx + 1, to_dtype_rne(acc_o, dx_ptr.dtype.element_ty), mask=m_mask[:, None])


def supported(K: int, blocksize: int) -> bool:
    """Whether the fused kernels take this weight: whole absmax blocks per row of W."""
    return blocksize <= MAX_BLOCKSIZE and K % blocksize == 0


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as triton.jit read it when it made the kernels


_CAPABILITY: dict[int, tuple[int, int]] = {}
# Up to PDL_MAX_M rows on sm_90+, the register-decode matmul is launched while X's copy runs
# (programmatic dependent launch) and waits for it in the kernel. One H100, same process, four rounds:
# M=64 45.4-46.8 us against 46.3-47.7 in flushed CUDA graphs, 50.4-51.4 against 52.4-53.1 by do_bench;
# M=16 34.1-34.8 against 34.7-35.4 (graphs). At M=128 it was slower (78.3-81.5 against 76.4-76.8).
PDL_MAX_M = 64


def _capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability; (0, 0) in the interpreter and off CUDA."""
    if _INTERPRET or device.type != "cuda":
        return (0, 0)
    cap = _CAPABILITY.get(device.index)
    if cap is None:
        cap = _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)
    return cap


def _register_decode(device: torch.device) -> bool:
    """Whether kind 4 runs here: not in the interpreter (no asm), and from sm_80 (on sm_75 Triton
    stages the decoded tile in shared memory: 128 KiB at blocksize 256, over the 64 KiB there)."""
    return _capability(device) >= (8, 0)


def _dot_dtype(dtype: torch.dtype):
    # Triton's interpreter gets bf16 arithmetic wrong (DESIGN.md): it multiplies in fp32 instead.
    if dtype == torch.bfloat16 and _INTERPRET:
        return tl.float32, "ieee"
    return TL_DTYPES[dtype], "ieee" if dtype == torch.float32 else "tf32"


def _config(M: int, dtype: torch.dtype, hopper: bool = False) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, LUT kind, SPLIT_K) by the number of rows
    (scripts/bench_kernels.py --sweep): in 16 bits the codes decoded in registers, one tile of M; on
    Hopper matmul4bit_tma's kernels, kind 6 from 2 to 64 rows and kind 5 from 65 (split-K 1)."""
    if dtype == torch.float32:
        return _lookup_config(M, dtype)
    if hopper and matmul4bit_tma.RS_MIN_M <= M <= matmul4bit_tma.MAX_M:
        block_m, warps, stages, _ = matmul4bit_tma.launch_config(M)
        if M <= matmul4bit_tma.RS_MAX_M:
            return block_m, 16 * warps, warps, stages, 6, 1
        return block_m, matmul4bit_tma.BLOCK_N, warps, stages, 5, 1
    if M <= 16:
        return 16, 128, 4, 3, 4, 4
    if M <= 32:
        return 32, 128, 4, 3, 4, 3
    if M <= 64:
        return 64, 128, 4, 4, 4, 2
    if M <= 128:
        return 128, 64, 4, 3, 4, 1
    return 256, 128, 8, 3, 4, 1


def _hopper(device: torch.device) -> bool:
    """Whether matmul4bit_tma's kernel can run here: sm_90 (its wgmma and TMA) with Gluon's Hopper API."""
    return _capability(device)[0] == 9 and matmul4bit_tma.gluon is not None


def fwd_max_m(x: torch.Tensor) -> int:
    """Rows of x up to which the fused forward beats dequantize + cuBLAS (FWD_MAX_M_REGS where the
    codes decode in registers, else FWD_MAX_M)."""
    return FWD_MAX_M_REGS if x.dtype != torch.float32 and _register_decode(x.device) else FWD_MAX_M


def _lookup_config(M: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """_config among the table lookups (kinds 0-3), also where kind 4 does not run; float32 tiles stay
    small enough for sm_75's 64 KiB of shared memory."""
    if M <= 16:  # nibble lookups (kind 3): 56.9-57.2 us at M=16; byte pairs (kind 2) 59.9, registers 69.9
        return 16, 64, 4, 3, 3 if dtype != torch.float32 else 0, 4
    if dtype == torch.float32:
        return (32 if M <= 32 else 64), 64, 4, 3, 0, 2 if M <= 64 else 1
    if M <= 32:
        return 32, 128, 4, 4, 0, 2
    if M <= 64:  # kind 2: 73.3-74.3 us against 78.8 with kind 3, 93 with kind 0; kind 4 74.2 at best
        return 64, 128, 4, 3, 2, 2
    return 128, 128, 8, 3, 0, 1


def _nested_args(absmax, nested):
    return nested if nested is not None else (absmax, absmax, absmax)


def _runs(blocks: int, split_k: int = 1, nblk: int = 1) -> tuple[int, int]:
    """(SPLIT_K, NBLK) for `blocks` absmax blocks per row: at most one run per block, and with NBLK > 1
    runs of equal length that are whole groups of NBLK (split and group size lowered until they fit)."""
    split_k = max(1, min(split_k, blocks))
    if nblk > 1:
        while blocks % split_k:
            split_k -= 1
        while nblk > 1 and (blocks // split_k) % nblk:
            nblk //= 2
    return split_k, nblk


_LOCKS: dict[tuple[int, int], torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 split-K tile counters for the current stream (each launch leaves them zeroed)."""
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index)) if device.type == "cuda" else (-1, 0)
    lock = _LOCKS.get(key)
    if lock is None or lock.numel() < n:
        lock = _LOCKS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return lock


@on_tensor_device
def forward(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, N: int, blocksize: int,
            nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None = None,
            config: tuple | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K, unit stride along K) @ deq(W)^T (+ bias) -> (M, N) in x's dtype. `packed` is any
    dtype viewed as bytes; absmax float32, or uint8 codes with nested = (nested_absmax,
    nested_code, offset). `config`: as _config returns, optionally with NBLK (absmax blocks per
    iteration) after SPLIT_K. LUT kind: _lookup's 0-3 in _fwd_kernel, 4, _fwd_regs_kernel (16-bit
    x; NBLK does not apply), or 5 and 6, matmul4bit_tma's (where they run, else kind 4's default)."""
    packed = packed.contiguous()  # the kernels read the bytes in order (no copy where they are)
    M, K = x.shape
    if config is None and M <= GEMV_MAX_M:  # (already on x's device)
        return gemv.__wrapped__(x, packed, absmax, code, N, blocksize, nested, bias, out=out)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    bm, bn, warps, stages, lut, *rest = config or _config(M, x.dtype, _hopper(x.device))
    asm = None
    if lut in (5, 6):
        asm = nibbles.decode_asm(code, x.dtype) if x.dtype != torch.float32 else None
        if asm is not None and _hopper(x.device) and matmul4bit_tma.usable(x, packed, blocksize, lut, absmax):
            return matmul4bit_tma.forward(x if lut == 5 else _x_order(x, blocksize, pdl=True), packed, absmax,
                                          _nested_args(absmax, nested), nested is not None, N, bias, asm, y,
                                          (bm, warps, stages), lut, code)
        bm, bn, warps, stages, lut, *rest = _config(M, x.dtype)
    if lut == 4:
        if x.dtype == torch.float32:
            raise ValueError("LUT kind 4 (decode in registers) takes float16 or bfloat16 inputs, not float32")
        asm = nibbles.decode_asm(code, x.dtype) if _register_decode(x.device) else None
        if asm is None:
            bm, bn, warps, stages, lut, *rest = _lookup_config(M, x.dtype)
    split_k, nblk = _runs(K // blocksize, *rest)
    na, nc, off = _nested_args(absmax, nested)
    grid = (cdiv(N, bn), cdiv(M, bm), split_k)
    ws, lock = _split_k_scratch(y, split_k, grid[0] * grid[1])
    pdl = asm is not None and M <= PDL_MAX_M and _capability(x.device) >= (9, 0)
    xk = x if asm is None else _x_order(x, blocksize, pdl)  # the register decode takes X's columns in its order
    head = (xk, packed.view(torch.uint8).reshape(-1), absmax)
    tail = (na, nc, off, bias if bias is not None else x, y, ws, lock, M, N, K, xk.stride(0), K // 2, y.stride(0))
    if asm is not None:
        launch(_fwd_regs_kernel, grid, *head, *tail, BS=blocksize, NESTED=nested is not None,
               HAS_BIAS=bias is not None, DECODE=asm, DOT=TL_DTYPES[x.dtype], BLOCK_M=bm, BLOCK_N=bn,
               SPLIT_K=split_k, PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl)
        return y
    dot, precision = _dot_dtype(x.dtype)
    launch(_fwd_kernel, grid, *head, code, *tail, BS=blocksize, NESTED=nested is not None,
           HAS_BIAS=bias is not None, DOT=dot, PRECISION=precision, LUT=int(lut), BLOCK_M=bm, BLOCK_N=bn,
           SPLIT_K=split_k, NBLK=nblk, num_warps=warps, num_stages=1 if lut == 1 else stages)
    return y


def _x_order(x: torch.Tensor, blocksize: int, pdl: bool = False) -> torch.Tensor:
    """x (M, K, unit stride along K) as a new (M, K) tensor with each absmax block's columns in
    _fwd_regs_kernel's k pair order."""
    M, K = x.shape
    out = torch.empty(M, K, dtype=x.dtype, device=x.device)
    key = (x.dtype, x.data_ptr() % 16, K, x.stride(0))  # what Triton specializes the arguments on (out: new)
    launch(_x_order_kernel, (cdiv(K, X_ORDER_BLOCK), M), x, out, K, x.stride(0), R=blocksize // 2,
           BLOCK=X_ORDER_BLOCK, PDL=pdl, key=key)
    return out


def _split_k_scratch(y: torch.Tensor, split_k: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's float32 partials of Y and its `tiles` output tiles' counters; y for both where unsplit."""
    if split_k == 1:
        return y, y
    return torch.empty(split_k, *y.shape, dtype=torch.float32, device=y.device), _locks(y.device, tiles)


_GEMV_PLANS: dict[tuple, Plan] = {}  # by everything a GEMV launch depends on but X's, Y's and scratch addresses


@on_tensor_device
def gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, N: int, blocksize: int,
         nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """As `forward`, on CUDA cores, each row of X on its own; config = (ROWS of W per step, STEPS per
    program, NB absmax blocks of 64 values per program, num_warps, LUT kind: 1 L1, 2 byte pairs, 3
    nibbles from shared memory). After the first launch for a weight and shape, later ones take its plan."""
    packed = packed.contiguous()  # the kernels read the bytes in order (no copy where they are)
    M, K = x.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    na, nc, off = _nested_args(absmax, nested)
    config = config or GEMV_CONFIG
    key = (config, blocksize, x.dtype, M, N, K, x.stride(0), y.stride(0), x.data_ptr() % 16, y.data_ptr() % 16,
           packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), nested is not None, na.data_ptr(), nc.data_ptr(),
           off.data_ptr(), 0 if bias is None else bias.data_ptr(), x.device.index)
    plan = recall(_GEMV_PLANS, key)
    if plan is not None:
        tiles, split_k, _ = plan.grid
        ws, lock = _split_k_scratch(y, split_k, tiles * M)
        plan(stream(x.device.index), (0, [x.data_ptr()]),
             (8, [y.data_ptr(), ws.data_ptr(), lock.data_ptr()]))
        return y
    rows, steps, nb, warps, lut = config
    if lut not in (1, 2, 3):
        raise ValueError(f"GEMV LUT kind {lut} is not one of 1, 2, 3")
    blocks = K // blocksize
    nb = max(1, nb * 64 // blocksize)
    while blocks % nb:  # the largest power of two <= nb that divides the blocks
        nb //= 2
    steps = min(steps, next_power_of_2(cdiv(N, rows)))
    split_k = blocks // nb
    grid = (cdiv(N, rows * steps), split_k, M)
    ws, lock = _split_k_scratch(y, split_k, grid[0] * M)
    args = (x, packed.view(torch.uint8).reshape(-1), absmax, code, na, nc, off, bias if bias is not None else x, y, ws,
            lock, M, N, K, x.stride(0), K // 2, y.stride(0))
    consts = dict(BS=blocksize, NESTED=nested is not None, HAS_BIAS=bias is not None, LUT=int(lut), ROWS=rows,
                  STEPS=steps, NB=nb, SPLIT_K=split_k)
    launcher = launch(_gemv_kernel, grid, *args, num_warps=warps, num_stages=1, **consts)
    remember(_GEMV_PLANS, key, Plan.of(launcher, grid, args, consts))
    return y


@on_tensor_device
def backward(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, K: int, blocksize: int,
             nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
             config: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dy (M, N, unit stride along N) @ deq(W) -> (M, K) in dy's dtype."""
    packed = packed.contiguous()  # the kernels read the bytes in order (no copy where they are)
    M, N = dy.shape
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device) if out is None else out
    bm, bn, warps, stages = (config or _config(M, dy.dtype))[:4]
    dot, precision = _dot_dtype(dy.dtype)
    na, nc, off = _nested_args(absmax, nested)
    grid = (K // blocksize, cdiv(M, bm))
    launch(_bwd_kernel, grid, dy, packed.view(torch.uint8).reshape(-1), absmax, code, na, nc, off, dx, M, N, K,
           dy.stride(0), dx.stride(0), BS=blocksize, NESTED=nested is not None, DOT=dot,
           PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dx
