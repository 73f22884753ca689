"""Fused multi-tensor Adam(W) step with blockwise 8-bit (or float32) moments, and its launcher.

One launch updates every tensor of a work list: each program takes a run of 256-value blocks of
one tensor (found through tables of pointers, sizes and state offsets), reads the parameter,
gradient and both moments once, and writes them once. The 8-bit moments live in flat buffers
(codes uint8, one float32 absmax per 256 values); the parameter and gradient pointers come from
tables because each tensor is its own allocation. Imports torch and triton only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # values per absmax block
BLOCKS_PER_PROGRAM = 4  # launch shape, read at launch (scripts/bench_optim.py sweeps them)
NUM_WARPS = 8


@triton.jit
def _dynamic_index(x, mids_ptr, SIGNED: tl.constexpr):
    """Index of the nearest entry of bitsandbytes' 8-bit dynamic map to x in [-1, 1], ties to the
    lower index (torch.bucketize over the 255 midpoints).

    The map's non-negative part holds, for decades k = 0..6, n = 2**k (signed) or 2**(k+1)
    (unsigned) evenly spaced means of [1e(k-7), 1e(k-6)). The decade of |x| comes from comparisons
    with the map's own midpoints between decades; within it, a closed-form guess biased low is the
    answer or the one below it (in magnitude), so a single midpoint comparison settles it."""
    ax = tl.abs(x)
    if SIGNED:
        base = 127
        zero = tl.load(mids_ptr + 127)
    else:
        base = 0
        zero = tl.load(mids_ptr + 0)
    k = tl.zeros(x.shape, tl.int32)
    for e in tl.static_range(1, 7):  # decade entries: midpoint before the first mean of decade e
        if SIGNED:
            k += (ax > tl.load(mids_ptr + 126 + (1 << e))).to(tl.int32)
        else:
            k += (ax > tl.load(mids_ptr + (2 << e) - 2)).to(tl.int32)
    if SIGNED:
        n = 1 << k
    else:
        n = 2 << k
    nf = n.to(tl.float32)
    inv_scale = tl.exp2((6 - k).to(tl.float32) * 3.321928094887362)  # 10**(6-k); a guess needs no exactness
    j = tl.floor((ax * inv_scale - 0.1) * nf * (1.0 / 0.9) - 1e-3)
    j = tl.minimum(tl.maximum(j, 0.0), nf - 1.0).to(tl.int32)
    guess = tl.where(ax <= zero, base, base + n - 1 + j + SIGNED)  # magnitude index, at most one too low
    if SIGNED:
        mirror = 254 - guess  # the same magnitude on the negative side
        neg = x < 0
        mid = tl.load(mids_ptr + tl.where(neg, tl.maximum(mirror - 1, 0), guess))
        idx = tl.where(neg, mirror - ((mirror > 0) & (x <= mid)).to(tl.int32), guess + (x > mid).to(tl.int32))
    else:
        idx = guess + (x > tl.load(mids_ptr + guess)).to(tl.int32)
    return idx


@triton.jit
def _to_param_dtype(x, P_DTYPE: tl.constexpr):
    """Round float32 to the parameter dtype to nearest-even. bf16 is rounded by hand: Triton's
    interpreter truncates on that cast (the GPU rounds; both then agree)."""
    if P_DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(P_DTYPE)


@triton.jit
def _quantize_rows(s, absmax, mids_ptr, SIGNED: tl.constexpr):
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax), 0.0)
    scaled = s * inv[:, None]
    idx = _dynamic_index(scaled, mids_ptr, SIGNED)
    if SIGNED:  # a negative first moment never rounds to +0 (keeps its sign, as in bitsandbytes)
        idx = tl.where((scaled < 0) & (idx == 127), 126, idx)
    return idx.to(tl.uint8)


@triton.jit
def _adam_kernel(work_ptr, pptr_ptr, gptr_ptr, numel_ptr, elem_off_ptr, block_off_ptr, scal_ptr,
                 s1_ptr, s2_ptr, a1_ptr, a2_ptr, code1_ptr, code2_ptr, mids1_ptr, mids2_ptr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, decay, l2, step_size, eps_hat,
                 P_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                 PER_TENSOR_STEP: tl.constexpr, NB: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    w = tl.program_id(0)
    slot = tl.load(work_ptr + 2 * w)
    first = tl.load(work_ptr + 2 * w + 1).to(tl.int64)
    p_ptr = tl.load(pptr_ptr + slot).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(gptr_ptr + slot).to(tl.pointer_type(P_DTYPE))
    numel = tl.load(numel_ptr + slot)
    elem_off = tl.load(elem_off_ptr + slot)
    if PER_TENSOR_STEP:  # tensors at different steps: bias corrections from the table
        step_size = tl.load(scal_ptr + 2 * slot)
        eps_hat = tl.load(scal_ptr + 2 * slot + 1)

    rows = first + tl.arange(0, NB)
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if USE_L2:
        g = g + l2 * p
    finite = (g == g) & (tl.abs(g) != float("inf"))
    g = tl.where(finite, g, 0.0)
    if EIGHT_BIT:
        block_off = tl.load(block_off_ptr + slot)
        row_mask = rows * BLOCK_SIZE < numel
        a1 = tl.load(a1_ptr + block_off + rows, mask=row_mask, other=0.0)
        a2 = tl.load(a2_ptr + block_off + rows, mask=row_mask, other=0.0)
        c1 = tl.load(s1_ptr + elem_off + offs, mask=mask, other=127).to(tl.int32)
        c2 = tl.load(s2_ptr + elem_off + offs, mask=mask, other=0).to(tl.int32)
        s1 = tl.load(code1_ptr + c1) * a1[:, None]
        s2 = tl.load(code2_ptr + c2) * a2[:, None]
    else:
        s1 = tl.load(s1_ptr + elem_off + offs, mask=mask, other=0.0)
        s2 = tl.load(s2_ptr + elem_off + offs, mask=mask, other=0.0)
    s1 = tl.where(finite & mask, s1 * beta1 + one_minus_beta1 * g, 0.0)
    s2 = tl.where(finite & mask, s2 * beta2 + one_minus_beta2 * g * g, 0.0)
    new = p + step_size * (s1 / (tl.sqrt(s2) + eps_hat))
    if USE_DECAY:
        new = new * decay
    tl.store(p_ptr + offs, _to_param_dtype(tl.where(finite, new, p), P_DTYPE), mask=mask)
    if EIGHT_BIT:
        n1 = tl.max(tl.abs(s1), axis=1)
        n2 = tl.max(tl.abs(s2), axis=1)
        tl.store(s1_ptr + elem_off + offs, _quantize_rows(s1, n1, mids1_ptr, True), mask=mask)
        tl.store(s2_ptr + elem_off + offs, _quantize_rows(s2, n2, mids2_ptr, False), mask=mask)
        tl.store(a1_ptr + block_off + rows, n1, mask=row_mask)
        tl.store(a2_ptr + block_off + rows, n2, mask=row_mask)
    else:
        tl.store(s1_ptr + elem_off + offs, s1, mask=mask)
        tl.store(s2_ptr + elem_off + offs, s2, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def work_list(numels: list[int], device: torch.device) -> torch.Tensor:
    """int32 (n_programs, 2): (tensor slot, first block) for runs of BLOCKS_PER_PROGRAM blocks."""
    items = [(slot, b) for slot, n in enumerate(numels) for b in range(0, -(-n // BLOCK), BLOCKS_PER_PROGRAM)]
    return torch.tensor(items, dtype=torch.int32, device=device).reshape(-1, 2)


def adam_step(work: torch.Tensor, p_ptrs: torch.Tensor, g_ptrs: torch.Tensor, numels: torch.Tensor,
              elem_offs: torch.Tensor, block_offs: torch.Tensor, scalars: torch.Tensor | tuple[float, float],
              state1: torch.Tensor, state2: torch.Tensor, absmax1: torch.Tensor | None, absmax2: torch.Tensor | None,
              maps: tuple[torch.Tensor, ...], *, dtype: torch.dtype, beta1: float, beta2: float,
              decay: float, l2: float) -> None:
    """Launch one step over a work list. Tables are device tensors indexed by slot: p_ptrs, g_ptrs
    (int64 addresses of contiguous tensors of `dtype`), numels, elem_offs (into state1/state2),
    block_offs (into absmax1/absmax2). `scalars`: (step_size, eps_hat) shared by all tensors, or a
    float32 (n, 2) device table of them per tensor. 8-bit when absmax1 is given (uint8 states),
    else float32 states. `decay` multiplies the parameter after the update (AdamW; 1.0 for none);
    `l2` times the parameter is added to the gradient (Adam). `maps`: (signed map, its 255
    midpoints, unsigned map, its midpoints), float32 on the device."""
    eight_bit = absmax1 is not None
    per_tensor = isinstance(scalars, torch.Tensor)
    code1, mids1, code2, mids2 = maps
    dummy = state1 if eight_bit else code1
    step_size, eps_hat = (0.0, 0.0) if per_tensor else scalars
    _adam_kernel[(work.shape[0],)](
        work, p_ptrs, g_ptrs, numels, elem_offs, block_offs, scalars if per_tensor else code1,
        state1, state2, absmax1 if eight_bit else dummy, absmax2 if eight_bit else dummy, code1, code2, mids1, mids2,
        beta1, beta2, 1.0 - beta1, 1.0 - beta2, decay, l2, step_size, eps_hat,
        P_DTYPE=_TL_DTYPES[dtype], EIGHT_BIT=eight_bit, USE_L2=l2 != 0.0, USE_DECAY=decay != 1.0,
        PER_TENSOR_STEP=per_tensor, NB=BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS,
    )
