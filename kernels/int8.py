"""LLM.int8 inference kernels and their launchers: outlier-column detection, row-wise int8
quantization of activations (outlier columns excluded), and an int8 x int8 -> int32 matmul with the
dequantization (row absmax x column absmax / 127^2), the outlier product and the bias fused into its
epilogue. Each rounds exactly as the torch reference in qtune/nn/linear8bit.py does. Imports torch
and triton only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import cdiv, next_power_of_2
from .rounding import TL_DTYPES, to_dtype_rne

QUANT_BLOCK_K = 1024  # columns per step of the row-wise quantizer
OUTLIER_BLOCK = (32, 128)  # rows x columns per program of the outlier-column scan


@triton.jit
def _outlier_columns_kernel(x_ptr, out_ptr, M, K, stride_xm, threshold,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
    hit = tl.max((tl.abs(x.to(tl.float32)) >= threshold).to(tl.int32), axis=0)
    # every program that sees an outlier in a column writes the same 1: a race without a loser
    tl.store(out_ptr + cols, hit.to(tl.uint8), mask=(cols < K) & (hit > 0))


@on_tensor_device
def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 mask (K,) of the columns of x (M x K, unit column stride) holding a value with
    |x| >= threshold, as (x.abs() >= threshold).any(0) in float32. No host synchronisation."""
    M, K = x.shape
    out = torch.zeros(K, dtype=torch.uint8, device=x.device)
    bm, bk = OUTLIER_BLOCK
    if M:
        grid = (cdiv(M, bm), cdiv(K, bk))
        _outlier_columns_kernel[grid](x, out, M, K, x.stride(0), float(threshold), BLOCK_M=bm, BLOCK_K=bk)
    return out


@triton.jit
def _quantize_rows_kernel(x_ptr, mask_ptr, codes_ptr, absmax_ptr, K, stride_xm,
                          HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    c_row = codes_ptr + row * K
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32))
        if HAS_MASK:
            x = tl.where(tl.load(mask_ptr + cols, mask=cols < K, other=0) != 0, 0.0, x)
        amax = tl.maximum(amax, x)
    absmax = tl.max(amax, axis=0)
    # 1 / absmax rounded, then times 127: the two roundings of the reference's `127.0 / stats`
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.where(absmax > 0, absmax, 1.0))
    scale = tl.where(absmax > 0, inv * 127.0, 0.0)
    tl.store(absmax_ptr + row, absmax)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_MASK:
            x = tl.where(tl.load(mask_ptr + cols, mask=cols < K, other=0) != 0, 0.0, x)
        # round half to even, as torch.round: |x * scale| <= 127.5 < 2**22, so adding 1.5 * 2**23
        # leaves an integer spacing of 1 (the kernel is compiled without FMA contraction)
        q = (x * scale + 12582912.0) - 12582912.0
        tl.store(c_row + cols, q.to(tl.int8), mask=cols < K)


@on_tensor_device
def quantize_rows(x: torch.Tensor, mask: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                  absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (M x K), float32 absmax (M,)) of the rows of x (M x K, float32/16, unit column
    stride): absmax over the columns not set in `mask` (uint8/bool (K,), or None for all), codes
    round-half-even(x * (127 / absmax)), 0 in masked columns and in all-zero rows."""
    M, K = x.shape
    codes = torch.empty(M, K, dtype=torch.int8, device=x.device) if codes is None else codes
    absmax = torch.empty(M, dtype=torch.float32, device=x.device) if absmax is None else absmax
    if M:
        m = x if mask is None else mask.view(torch.uint8)
        _quantize_rows_kernel[(M,)](x, m, codes, absmax, K, x.stride(0), HAS_MASK=mask is not None,
                                    BLOCK_K=min(QUANT_BLOCK_K, next_power_of_2(K)),
                                    num_warps=4, enable_fp_fusion=False)
    return codes, absmax


@triton.jit
def _int8_matmul_kernel(a_ptr, w_ptr, out_ptr, sa_ptr, sw_ptr, bias_ptr, add_ptr, M, N, K,
                        stride_am, stride_wn, stride_om, stride_addm,
                        HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, OUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    # grouped order: GROUP_M row blocks sweep the column blocks together, sharing weight tiles in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M / N read row 0 (in bounds) instead of masking every load; they are never stored
    am = tl.where(rm < M, rm, 0).to(tl.int64)
    wn = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + wn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N): W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
            w = tl.load(w_ptrs, mask=(k0 + rk)[:, None] < K, other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # epilogue, in the reference's order: float(acc) * (sa * sw / 127^2) (+ add) (+ bias), one rounding
    row_in = rm < M
    col_in = rn < N
    sa = tl.load(sa_ptr + rm, mask=row_in, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=col_in, other=0.0)
    prod = sa[:, None] * sw[None, :]
    y = acc.to(tl.float32) * tl.math.div_rn(prod, tl.full(prod.shape, 16129.0, tl.float32))
    inside = row_in[:, None] & col_in[None, :]
    om = rm.to(tl.int64)[:, None]
    if HAS_ADD:
        y = y + tl.load(add_ptr + om * stride_addm + rn[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + om * stride_om + rn[None, :], to_dtype_rne(y, OUT), mask=inside)


def _matmul_config(M: int) -> dict:
    """Launch shape by the number of rows: weight-streaming tiles for decoding, square ones for prefill."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


@on_tensor_device
def int8_matmul(a: torch.Tensor, a_absmax: torch.Tensor, w: torch.Tensor, w_absmax: torch.Tensor,
                dtype: torch.dtype, bias: torch.Tensor | None = None, add: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """(a @ w^T) * a_absmax[:, None] * w_absmax[None, :] / 127^2 (+ add) (+ bias) in `dtype`, for
    int8 a (M x K) and w (N x K), both with unit column stride, float32 absmax vectors, `add` a float
    (M x N) tensor (the outlier product) and `bias` (N,). Products are summed exactly in int32; the
    epilogue computes in float32 and rounds once to `dtype`. No host synchronisation."""
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=dtype, device=a.device) if out is None else out
    if M == 0 or N == 0:
        return out
    cfg = _matmul_config(M)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _int8_matmul_kernel[grid](a, w, out, a_absmax, w_absmax, out if bias is None else bias,
                              out if add is None else add, M, N, K, a.stride(0), w.stride(0), out.stride(0),
                              0 if add is None else add.stride(0), HAS_BIAS=bias is not None,
                              HAS_ADD=add is not None, OUT=TL_DTYPES[dtype], EVEN_K=K % cfg["BLOCK_K"] == 0,
                              enable_fp_fusion=False, **cfg)
    return out
