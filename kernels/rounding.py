"""Stores of float32 values into 16-bit tensors, rounded to nearest-even on the GPU and in Triton's
interpreter alike (the interpreter truncates on a float32 -> bf16 cast)."""

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}  # torch -> Triton


@triton.jit
def to_dtype_rne(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
