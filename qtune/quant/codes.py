"""Code tables of the 4-bit formats and the 8-bit dynamic map, as bitsandbytes defines them.

Everything here is a constant computed once on the CPU in float32; callers move it to their device.
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# NF4: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA), index = stored nibble.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order; divided by 12 below.
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# FP4 is quantized sign/magnitude: the nibble's top bit is the sign of x, the low three bits the
# nearest magnitude, found with these float32 thresholds (bitsandbytes' literals, which are the
# midpoints of the sorted magnitudes written to ~7 digits) and the magnitude codes between them.
_FP4_MAG_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
_FP4_MAG_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


@functools.cache
def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 values a nibble decodes to (before scaling by the block's absmax)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        t = torch.tensor(_FP4, dtype=torch.float32)
        return t / t.abs().max()
    raise ValueError(f"quant_type {quant_type!r} is not supported; allowed: {', '.join(QUANT_TYPES)}")


@functools.cache
def nf4_thresholds() -> torch.Tensor:
    """Midpoints between consecutive NF4 codes (float64 midpoint, rounded to float32)."""
    c = torch.tensor(_NF4, dtype=torch.float64)
    return ((c[:-1] + c[1:]) / 2).to(torch.float32)


@functools.cache
def fp4_magnitude_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds float32 (7,), magnitude nibbles uint8 (8,)) for sign/magnitude FP4 rounding."""
    return (torch.tensor(_FP4_MAG_THRESHOLDS, dtype=torch.float32),
            torch.tensor(_FP4_MAG_CODES, dtype=torch.uint8))


@functools.cache
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry 8-bit dynamic map of bitsandbytes' `create_dynamic_map(signed)`, sorted.

    Exponent k = 0..6 scales 10**(k-6) times the means of consecutive points of a linspace over
    [0.1, 1] with 2**k (signed) or 2**(k+1) (unsigned) intervals; 0 and 1 complete the table.
    """
    values: list[float] = []
    for k in range(7):
        n = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (k - 6)  # multiplied in float32, as bitsandbytes does
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)
