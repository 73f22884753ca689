"""Fused dequantize-matmul with a packed 4-bit weight W (N x K, bitsandbytes' layout): the forward
Y = X @ deq(W)^T (+ bias) and the input gradient dX = dY @ deq(W), and their launchers. Imports
torch and triton only.

Each program walks K (forward) or N (backward) one absmax block at a time: it reads the block's
packed bytes once, looks the nibbles up in the 16-entry code table, multiplies by the tensor-core
dot in the compute dtype and applies the block's absmax (decoded from its nested 8-bit code when
double-quantized) to the float32 partial product. Even and odd columns of a byte's two values meet
even and odd columns of X, so no interleaving is needed. Needs K % blocksize == 0 and
blocksize <= 256; callers fall back to dequantize + cuBLAS otherwise and where that is faster.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .rounding import to_dtype_rne

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
MAX_BLOCKSIZE = 256
# Rows of X (dY) up to which the fused kernel beats dequantize + cuBLAS (scripts/bench_kernels.py --sweep).
FWD_MAX_M = 256
BWD_MAX_M = 16


@triton.jit
def _absmax(absmax_ptr, blk, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED: tl.constexpr):
    """float32 absmax of blocks `blk` (nested: code[q] * nested_absmax + offset, as the reference)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        am = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return am


@triton.jit
def _codes(packed_ptr, code_ptr, byte_offs, mask, DOT: tl.constexpr):
    """The two values of each byte (high nibble first) in the dot's dtype, unscaled."""
    byte = tl.load(packed_ptr + byte_offs, mask=mask, other=0).to(tl.int32)
    return tl.load(code_ptr + (byte >> 4)).to(DOT), tl.load(code_ptr + (byte & 15)).to(DOT)


@triton.jit
def _fwd_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
                y_ptr, M, N, K, stride_xm, stride_ym,
                BS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)  # N fastest: programs that share X run together
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BS // 2)
    m_mask, n_mask = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + 2 * h[None, :]
    w_cols = rn.to(tl.int64)[None, :] * (K // 2) + h[:, None]  # (BS/2, BLOCK_N) byte offsets
    blocks_per_row = K // BS
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(0, blocks_per_row):
        xe = tl.load(x_rows + kb * BS, mask=m_mask[:, None], other=0.0).to(DOT)
        xo = tl.load(x_rows + kb * BS + 1, mask=m_mask[:, None], other=0.0).to(DOT)
        hi, lo = _codes(packed_ptr, code_ptr, w_cols + kb * (BS // 2), n_mask[None, :], DOT)
        part = tl.dot(xe, hi, input_precision=PRECISION)
        part = tl.dot(xo, lo, part, input_precision=PRECISION)
        am = _absmax(absmax_ptr, rn.to(tl.int64) * blocks_per_row + kb, n_mask, nested_absmax_ptr, nested_code_ptr,
                     offset_ptr, NESTED)
        acc += part * am[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, to_dtype_rne(acc, y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :],
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        am = _absmax(absmax_ptr, rn.to(tl.int64) * blocks_per_row + kb, n_mask, nested_absmax_ptr, nested_code_ptr,
                     offset_ptr, NESTED)
        dy = (dy * am[None, :]).to(DOT)  # the absmax scales W's rows: fold it into dY's columns
        hi, lo = _codes(packed_ptr, code_ptr, rn.to(tl.int64)[:, None] * (K // 2) + kb * (BS // 2) + h[None, :],
                        n_mask[:, None], DOT)
        acc_e = tl.dot(dy, hi, acc_e, input_precision=PRECISION)
        acc_o = tl.dot(dy, lo, acc_o, input_precision=PRECISION)
    dx = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + kb * BS + 2 * h[None, :]
    tl.store(dx, to_dtype_rne(acc_e, dx_ptr.dtype.element_ty), mask=m_mask[:, None])
    tl.store(dx + 1, to_dtype_rne(acc_o, dx_ptr.dtype.element_ty), mask=m_mask[:, None])


def supported(K: int, blocksize: int) -> bool:
    """Whether the fused kernels take this weight: whole absmax blocks per row of W."""
    return blocksize <= MAX_BLOCKSIZE and K % blocksize == 0


def _dot_dtype(dtype: torch.dtype):
    # Triton's interpreter gets bf16 arithmetic wrong (DESIGN.md): it multiplies in fp32 instead.
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32, "ieee"
    return _TL[dtype], "ieee" if dtype == torch.float32 else "tf32"


def _config(M: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by the number of rows (scripts/bench_kernels.py --sweep);
    float32 tiles stay small enough for sm_75's 64 KiB of shared memory."""
    if M <= 16:
        return 16, 32, 4, 4
    if M <= 32:
        return 32, 64, 4, 4
    if M <= 64 or dtype == torch.float32:
        return 64, 64, 4, 3
    return 128, 128, 8, 3


def _nested_args(absmax, nested):
    return nested if nested is not None else (absmax, absmax, absmax)


def forward(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, N: int, blocksize: int,
            nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None = None,
            config: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K, unit stride along K) @ deq(W)^T (+ bias) -> (M, N) in x's dtype. `packed` is any
    dtype viewed as bytes; absmax float32, or uint8 codes with nested = (nested_absmax,
    nested_code, offset)."""
    M, K = x.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    bm, bn, warps, stages = config or _config(M, x.dtype)
    dot, precision = _dot_dtype(x.dtype)
    na, nc, off = _nested_args(absmax, nested)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _fwd_kernel[grid](x, packed.view(torch.uint8).reshape(-1), absmax, code, na, nc, off,
                      bias if bias is not None else x, y, M, N, K, x.stride(0), y.stride(0),
                      BS=blocksize, NESTED=nested is not None, HAS_BIAS=bias is not None, DOT=dot,
                      PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return y


def backward(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, K: int, blocksize: int,
             nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
             config: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dy (M, N, unit stride along N) @ deq(W) -> (M, K) in dy's dtype."""
    M, N = dy.shape
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device) if out is None else out
    bm, bn, warps, stages = config or _config(M, dy.dtype)
    dot, precision = _dot_dtype(dy.dtype)
    na, nc, off = _nested_args(absmax, nested)
    grid = (K // blocksize, triton.cdiv(M, bm))
    _bwd_kernel[grid](dy, packed.view(torch.uint8).reshape(-1), absmax, code, na, nc, off, dx, M, N, K,
                      dy.stride(0), dx.stride(0), BS=blocksize, NESTED=nested is not None, DOT=dot,
                      PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dx
