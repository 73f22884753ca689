"""Public 4-bit quantize/dequantize: argument checks, then the backend for the tensor's device.

CUDA tensors go to the Triton kernels, everything else to the torch reference; QTUNE_BACKEND=torch
forces the reference for debugging.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import replace

import torch

from . import reference
from .codes import BLOCKSIZES, FLOAT_DTYPES, QUANT_TYPES
from .state import QuantState, check_dtype, dtype_name

STORAGE_DTYPES = (torch.uint8, *FLOAT_DTYPES)


def check_quant_args(quant_type: str, blocksize: int) -> None:
    """One-line ValueError for a quant type or blocksize that the format does not allow."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not supported; allowed: {', '.join(QUANT_TYPES)}")
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not allowed; allowed: {', '.join(map(str, BLOCKSIZES))}")


def check_finite(A: torch.Tensor, name: str) -> None:
    """Refuse NaN/Inf: one bad value would poison its block (and, with double quantization, the
    mean offset shared by the whole tensor)."""
    if not bool(torch.isfinite(A).all()):
        raise _non_finite_error(int((~torch.isfinite(A)).sum()), A, name)


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    name: str = "tensor",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize A blockwise to 4 bits in bitsandbytes' format: (packed (ceil(n/2) bytes, as a
    (rows, 1) tensor of quant_storage), QuantState). `name` labels A in error messages."""
    check_quant_args(quant_type, blocksize)
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(A).__name__}")
    check_dtype(A.dtype, name)
    if quant_storage not in STORAGE_DTYPES:
        raise TypeError(f"quant_storage {quant_storage} is not supported; allowed: "
                        f"{', '.join(dtype_name(t) for t in STORAGE_DTYPES)}")
    if A.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(A.shape)}); nothing to quantize")
    if A.dtype in FLOAT_DTYPES and use_kernel(A):
        return _quantize_4bit_kernel(A, blocksize, quant_type, double_quant, quant_storage, name)
    check_finite(A, name)
    return reference.quantize_4bit(A, blocksize, quant_type, double_quant, quant_storage)


def _non_finite_error(bad: int, A: torch.Tensor, name: str) -> ValueError:
    return ValueError(f"{name} has {bad} non-finite value{'s' if bad != 1 else ''} (NaN/Inf) "
                      f"of {A.numel()}; refusing to quantize it")


@functools.cache
def _device_tables(quant_type: str, device: torch.device):
    """(code table, the kernel's rounding table, FP4 magnitude nibbles or None, nested 8-bit map) on
    `device`, copied there once: a host-to-device copy per quantized tensor would stall the stream."""
    from ..kernels.quantize import threshold_table
    from .codes import code_table, dynamic_map, fp4_magnitude_tables, nf4_thresholds

    if quant_type == "nf4":
        thresholds, mags = nf4_thresholds(), None
    else:
        thresholds, mags = fp4_magnitude_tables()
        mags = mags.to(device)
    table = threshold_table(thresholds, signed=quant_type == "nf4")
    return code_table(quant_type).to(device), table.to(device), mags, dynamic_map(True).to(device)


def _quantize_4bit_kernel(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool,
                          quant_storage: torch.dtype, name: str) -> tuple[torch.Tensor, QuantState]:
    """The Triton path of quantize_4bit: same bytes and state as the reference. A block holding NaN
    or Inf gets a non-finite absmax, so the nested offset (or the largest absmax) tells, read once at
    the end (one host synchronisation); the values are counted only for the error. The states share
    the device's code tables (read-only; to_dict and QuantState.to copy them)."""
    from ..kernels import quantize as kq
    from .state import NestedState

    n_bytes = -(-A.numel() // 2)
    padded = n_bytes + (-n_bytes % quant_storage.itemsize)
    packed = torch.empty(padded, dtype=torch.uint8, device=A.device)
    if padded > n_bytes:
        packed[n_bytes:].zero_()
    code, thresholds, mags, nested_code = _device_tables(quant_type, A.device)
    absmax = kq.quantize_4bit(A.contiguous(), blocksize, quant_type == "fp4", thresholds,
                              packed if mags is None else mags, packed)
    state = QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code)
    if double_quant:
        offset = check = absmax.mean()
        q, absmax2 = kq.quantize_blockwise_8bit(absmax, offset, nested_code)
        state.absmax = q
        state.nested = NestedState(absmax=absmax2, code=nested_code, offset=offset)
    else:
        check = absmax.amax()
    if not math.isfinite(float(check)):  # NaN/Inf in A (or a mean past float32's range: counted to be sure)
        bad = int((~torch.isfinite(A)).sum())
        if bad:
            raise _non_finite_error(bad, A, name)
    return packed.view(quant_storage).reshape(-1, 1), state


def check_packed_size(packed: torch.Tensor, state: QuantState, name: str = "packed weight") -> None:
    """One-line ValueError when `packed` holds fewer bytes than the state's shape needs."""
    need, have = -(-state.numel // 2), packed.numel() * packed.element_size()
    if have < need:
        raise ValueError(f"{name} holds {have} bytes; shape {tuple(state.shape)} needs {need}")


def use_kernel(t: torch.Tensor) -> bool:
    """The Triton kernels for CUDA tensors; QTUNE_BACKEND=torch forces the torch reference,
    QTUNE_BACKEND=triton the kernels (on the CPU under TRITON_INTERPRET=1, for tests)."""
    backend = os.environ.get("QTUNE_BACKEND", "").lower()
    return backend == "triton" or (t.is_cuda and backend != "torch")


def row_chunk(state: QuantState, max_elements: int) -> int:
    """Rows per piece for decoding a 2-D packed weight in pieces of at most about `max_elements`
    values, each piece starting on an absmax block (and nested block) boundary; all rows when the
    weight is that small or cannot be cut so."""
    rows, cols = state.shape if len(state.shape) == 2 else (1, state.numel)
    if rows * cols <= max_elements or cols % state.blocksize:
        return rows
    unit = 1  # rows per aligned step: a whole number of nested blocks of absmax blocks
    if state.nested is not None:
        blocks = cols // state.blocksize
        unit = state.nested.blocksize // math.gcd(blocks, state.nested.blocksize)
    pieces = -(-rows * cols // max_elements)
    per = -(-rows // pieces)
    return min(rows, -(-per // unit) * unit)


def dequantize_4bit_rows(packed: torch.Tensor, state: QuantState, dtype: torch.dtype, start: int,
                         stop: int) -> torch.Tensor:
    """Rows start..stop of a 2-D packed weight decoded to `dtype` (start on a `row_chunk` boundary)."""
    cols = state.shape[1]
    b0, b1 = start * cols // state.blocksize, stop * cols // state.blocksize
    nested = state.nested
    if nested is not None:
        n0 = b0 // nested.blocksize
        nested = replace(nested, absmax=nested.absmax[n0: -(-b1 // nested.blocksize)])
    part = replace(state, absmax=state.absmax[b0:b1], shape=torch.Size((stop - start, cols)), nested=nested)
    return dequantize_4bit(packed.view(torch.uint8).reshape(-1)[start * cols // 2: stop * cols // 2], part, dtype)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a packed 4-bit tensor to `dtype` (default: the dtype it was quantized from)."""
    check_packed_size(packed, state)
    dtype = dtype or state.dtype
    if dtype in FLOAT_DTYPES and use_kernel(packed):
        from ..kernels import dequant

        return dequant.dequantize_4bit(packed, state.absmax, state.code, state.shape, state.blocksize, dtype,
                                       state.nested_tensors)
    return reference.dequantize_4bit(packed, state, dtype)
