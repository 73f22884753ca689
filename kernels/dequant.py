"""Dequantize a packed 4-bit tensor (NF4/FP4, optional double-quantized absmax decoded in the same
pass) to float32/float16/bfloat16, and its launcher. Imports torch and triton only."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .launch import Plan, cdiv, launch, recall, remember, stream
from .rounding import TL_DTYPES, to_dtype_rne

# Launch shape (scripts/bench_kernels.py --sweep-formats): packed bytes per program and warps. Measured
# on an H100, bf16 NF4 + double quant: 4096 bytes and 4 warps 68.3 us at 13824x5120 (87% of copy
# bandwidth) and 207 us at 28672x8192 (95%), against 79.4 / 249.7 us with 1024 bytes; 8 warps, and
# stores with an evict-first hint, were no faster.
BYTES_PER_PROGRAM = 4096  # 8192 values
NUM_WARPS = 4


@triton.jit
def _dequant4_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, n, n_blocks,
                     nested_absmax_ptr, nested_code_ptr, offset_ptr,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, OUT: tl.constexpr, NB: tl.constexpr):
    """NB whole blocks per program, as rows: each block's absmax is loaded (and decoded) once, not
    once per byte."""
    rows = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    b = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    byte = tl.load(packed_ptr + b, mask=b < n_bytes, other=0).to(tl.int32)
    if NESTED:  # code[q] * nested_absmax + offset, as the reference decodes it
        q = tl.load(absmax_ptr + rows, mask=rows < n_blocks, other=0).to(tl.int32)
        am = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + rows // 256, mask=rows < n_blocks, other=0.0)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + rows, mask=rows < n_blocks, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * am[:, None]
    lo = tl.load(code_ptr + (byte & 15)) * am[:, None]
    vals = tl.join(hi, lo).reshape(NB, BLOCKSIZE)  # element 2i from the high nibble, 2i + 1 from the low
    e = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + e, to_dtype_rne(vals, OUT), mask=e < n)


_PLANS: dict[tuple, Plan] = {}  # by everything a launch depends on but the output's address


def _key(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype,
         nested: tuple | None, out_address: int, config: tuple[int, int] | None) -> tuple:
    """What a launch depends on but the output's address (of which only its 16-byte alignment)."""
    na, nc, off = nested if nested is not None else (absmax, code, absmax)
    return (packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), na.data_ptr(), nc.data_ptr(), off.data_ptr(), n,
            blocksize, dtype, nested is not None, out_address % 16, config, packed.device.index)


@on_tensor_device
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size,
                    blocksize: int, dtype: torch.dtype, nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                    out: torch.Tensor | None = None, config: tuple[int, int] | None = None) -> torch.Tensor:
    """code[q] * absmax per element, cast to dtype, in `shape`. `packed` is any dtype viewed as
    bytes; `absmax` is float32, or uint8 codes decoded with nested = (nested_absmax, nested_code
    (256), offset (0-d tensor)). No host synchronisation. `config`: (bytes per program, warps),
    default the module's measured one. After the first launch for a weight, later ones take its plan."""
    packed = packed.contiguous()  # the kernel reads the bytes in order (no copy where they are)
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device) if out is None else out
    key = _key(packed, absmax, code, n, blocksize, dtype, nested, out.data_ptr(), config)
    plan = recall(_PLANS, key)
    if plan is not None:
        plan(stream(packed.device.index), (3, [out.data_ptr()]))
        return out
    flat = packed.view(torch.uint8).reshape(-1)
    n_bytes, n_blocks = (n + 1) // 2, -(-n // blocksize)
    per_program, warps = config or (BYTES_PER_PROGRAM, NUM_WARPS)
    nb = max(1, 2 * per_program // blocksize)
    grid = (cdiv(n_blocks, nb),)
    na, nc, off = nested if nested is not None else (absmax, code, absmax)
    args = (flat, absmax, code, out, n_bytes, n, n_blocks, na, nc, off)
    consts = dict(BLOCKSIZE=blocksize, NESTED=nested is not None, OUT=TL_DTYPES[dtype], NB=nb)
    launcher = launch(_dequant4_kernel, grid, *args, num_warps=warps, enable_fp_fusion=False, **consts)
    remember(_PLANS, key, Plan.of(launcher, grid, args, consts))
    return out


def decoder(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size, blocksize: int,
            dtype: torch.dtype, nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
            ) -> Callable[[], torch.Tensor]:
    """dequantize_4bit(...) into a new tensor, as a function of no arguments. Where the weight's plan
    exists, the function only allocates and replays it (with its device current): an input gradient's
    decode runs in autograd's device thread, where each call into torch costs more."""
    run = functools.partial(dequantize_4bit, packed, absmax, code, shape, blocksize, dtype, nested)
    if not packed.is_cuda or not packed.is_contiguous():
        return run
    key = _key(packed, absmax, code, math.prod(shape), blocksize, dtype, nested, 0, None)  # new tensors are aligned
    plan = recall(_PLANS, key)
    if plan is None:
        return run
    device, index = packed.device, packed.device.index

    def decode() -> torch.Tensor:
        if torch.cuda.current_device() != index:
            return run()
        out = torch.empty(shape, dtype=dtype, device=device)
        plan(stream(index), (3, [out.data_ptr()]))
        return out

    return decode
