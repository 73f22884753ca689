"""Torch reference of the 4-bit and 8-bit blockwise formats: the CPU path and the test oracle.

Rounding follows bitsandbytes bit for bit: each value is multiplied by the float32 reciprocal of
its block's absmax (not divided), then mapped to a code by float32 threshold comparisons; an
all-zero block scales by 0 so it encodes (and decodes to) exact zeros.
"""

from __future__ import annotations

import torch

from .codes import NESTED_BLOCKSIZE, code_table, dynamic_map, fp4_magnitude_tables, nf4_thresholds
from .state import NestedState, QuantState


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flat float32 view of x, zero-padded to whole blocks, as (n_blocks, blocksize)."""
    x = x.reshape(-1).float()
    pad = -x.numel() % blocksize
    return torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)


def _scale_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * (1/absmax) per block, flattened to x's size; absmax float32 per block)."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return (blocks * inv[:, None]).reshape(-1)[: x.numel()], absmax


def round_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nibble (uint8 0..15) of each float32 value in [-1, 1]; ties go to the smaller magnitude
    for FP4 (sign/magnitude) and to the lower code for NF4."""
    if quant_type == "nf4":
        return torch.bucketize(scaled, nf4_thresholds().to(scaled.device)).to(torch.uint8)
    thresholds, mags = fp4_magnitude_tables()
    mag = mags.to(scaled.device)[torch.bucketize(scaled.abs(), thresholds.to(scaled.device))]
    return mag | (scaled < 0).to(torch.uint8) << 3


def zero_code(quant_type: str) -> int:
    """The nibble that 0.0 rounds to (also the padding nibble of an odd element count)."""
    return int(round_4bit(torch.zeros(1), quant_type))


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble; an odd count gets one `pad_code`."""
    codes = codes.reshape(-1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return codes[0::2] << 4 | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n codes (uint8) of packed bytes (any dtype viewed as bytes)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1)[:n]


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a sorted 256-entry map: (uint8 codes, float32 absmax).

    Codes come from bitsandbytes' 7-step binary search over the map, then a choice between the
    final pivot and the last bracketing pivot by their float32 midpoint; emulated exactly here.
    """
    scaled, absmax = _scale_blocks(x, blocksize)
    code = code.to(scaled.device)
    pivot = torch.full(scaled.shape, 127, dtype=torch.int64, device=scaled.device)
    lo_pivot, hi_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lo, hi = torch.full_like(scaled, -1.0), torch.full_like(scaled, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = scaled > val
        lo_pivot, lo = torch.where(up, pivot, lo_pivot), torch.where(up, val, lo)
        hi_pivot, hi = torch.where(up, hi_pivot, pivot), torch.where(up, hi, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    hi = torch.where(hi_pivot == 255, code[255], hi)
    lo = torch.where(lo_pivot == 0, code[0], lo)
    up = scaled > val
    q = torch.where(up, torch.where(scaled > (hi + val) * 0.5, hi_pivot, pivot),
                    torch.where(scaled < (lo + val) * 0.5, lo_pivot, pivot))
    return q.to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 code[q] * absmax of q's block, flat."""
    vals = code.to(q.device)[q.reshape(-1).long()]
    return (_blocks(vals, blocksize) * absmax[:, None]).reshape(-1)[: q.numel()]


def quantize_4bit(
    A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool, quant_storage: torch.dtype
) -> tuple[torch.Tensor, QuantState]:
    """Packed (ceil(n/2) bytes as (rows, 1) of quant_storage) and its QuantState; inputs are checked
    by the caller (qtune.quant.quantize_4bit)."""
    scaled, absmax = _scale_blocks(A, blocksize)
    packed = pack_nibbles(round_4bit(scaled, quant_type), zero_code(quant_type))
    pad = -packed.numel() % quant_storage.itemsize
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    packed = packed.view(quant_storage).reshape(-1, 1)
    state = QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code_table(quant_type).to(A.device))
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map(True).to(A.device)
        q, absmax2 = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state.absmax = q
        state.nested = NestedState(absmax=absmax2, code=nested_code, offset=offset)
    return packed, state


def absmax_fp32(state: QuantState) -> torch.Tensor:
    """The float32 absmax per block, decoding double quantization if present."""
    if state.nested is None:
        return state.absmax
    n = state.nested
    return dequantize_blockwise_8bit(state.absmax, n.code, n.absmax, n.blocksize) + n.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """code[q] * absmax in float32, cast to dtype, in the state's shape."""
    codes = unpack_nibbles(packed, state.numel)
    vals = code_table(state.quant_type).to(packed.device)[codes.long()]
    vals = _blocks(vals, state.blocksize) * absmax_fp32(state)[:, None]
    return vals.reshape(-1)[: state.numel].to(dtype).view(state.shape)
