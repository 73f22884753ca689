"""Counter-based dropout: the keep mask is a hash of (seed, salt, element index), so the same call
gives the same mask again (in gradient checkpointing's recomputation, in the backward pass) with no
random-number-generator state to save or restore, and a seed held in a device tensor lets a CUDA
graph replay draw new masks. Imports torch and triton only.

keep(i) = fmix32(i * 0x9E3779B1 ^ fmix32(seed * 0x85EBCA77 + salt)) >= threshold, fmix32 being
MurmurHash3's 32-bit finalizer and threshold = floor(p * 2**32); kept values are scaled by 1/(1-p).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import cdiv
from .rounding import TL_DTYPES, to_dtype_rne

BLOCK = 2048


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["salt", "threshold"])  # (n stays specialized: n % 16 == 0 vectorizes the loads)
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, seed_out_ptr, n, salt, threshold, scale, DTYPE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    offs = (pid.to(tl.int64) if WIDE else pid) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    seed_in = tl.load(seed_ptr)
    tl.store(seed_out_ptr, seed_in, mask=pid == 0)  # the seed this call used, for its backward
    seed = seed_in.to(tl.uint32)
    key = _fmix32(seed * 0x85EBCA77 + salt.to(tl.uint32))
    h = _fmix32((offs.to(tl.uint32) * 0x9E3779B1) ^ key)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(h.to(tl.int64) >= threshold, x * scale, 0.0)
    tl.store(y_ptr + offs, to_dtype_rne(y, DTYPE), mask=mask)


@on_tensor_device
def dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float,
            seed_out: torch.Tensor | None = None) -> torch.Tensor:
    """x with the elements the hash drops zeroed and the rest scaled by 1/(1-p), in x's dtype.
    `seed`: a 1-element int64 tensor on x's device (read by the kernel, so graphs see updates);
    `seed_out` (same kind) receives the value used, so the backward can repeat the mask after the
    seed has moved on (no separate copy)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _dropout_kernel[(cdiv(n, BLOCK),)](x, y, seed, seed if seed_out is None else seed_out, n,
                                           salt % 2**32, threshold(p), 1.0 / (1.0 - p),
                                           DTYPE=TL_DTYPES[x.dtype], BLOCK_SIZE=BLOCK, WIDE=n >= 2**31 - BLOCK)
    elif seed_out is not None:
        seed_out.copy_(seed)
    return y


def threshold(p: float) -> int:
    """Hashes below this drop their element: floor(p * 2**32)."""
    return int(p * 2**32)
