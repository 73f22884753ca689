"""Both nibbles of packed 4-bit bytes decoded to their 16-bit codes in registers, by byte permutes
(PTX prmt) over the code table held as immediates: no lookup through memory, and an elementwise op,
so Triton decodes in the layout of the MMA operand that consumes the codes (a decode through shared
memory or a gather pins the decoded tile to another layout, then converts it through shared memory).
Imports torch and triton only.

The table's 16 codes in the compute dtype are 16 low bytes and 16 high bytes, four 32-bit words each.
`prmt` picks 4 bytes out of 8 by 3-bit selectors, so each half of the table is looked up and bit 3 of
the nibble picks between the halves. A 32-bit word of 4 packed bytes holds 8 nibbles in selector
position already (the low 16 bits select for bytes 0 and 1, the high 16 for bytes 2 and 3): 21
instructions decode 8 codes. Each output word holds one byte's codes, high nibble in the low half
(column 2i first, as the bytes pack them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TEMPLATE = """{{
.reg .b32 s, s2, c, m1, m2, a, b, l1, l2, h1, h2;
and.b32 s, $4, 0x77777777;
shr.b32 s2, s, 16;
shl.b32 c, $4, 4;
prmt.b32 m1, c, $4, 0xD9C8;
prmt.b32 m2, c, $4, 0xFBEA;
prmt.b32 a, {L0}, {L1}, s;
prmt.b32 b, {L2}, {L3}, s;
lop3.b32 l1, a, b, m1, 0xD8;
prmt.b32 a, {L0}, {L1}, s2;
prmt.b32 b, {L2}, {L3}, s2;
lop3.b32 l2, a, b, m2, 0xD8;
prmt.b32 a, {H0}, {H1}, s;
prmt.b32 b, {H2}, {H3}, s;
lop3.b32 h1, a, b, m1, 0xD8;
prmt.b32 a, {H0}, {H1}, s2;
prmt.b32 b, {H2}, {H3}, s2;
lop3.b32 h2, a, b, m2, 0xD8;
prmt.b32 $0, l1, h1, 0x4051;
prmt.b32 $1, l1, h1, 0x6273;
prmt.b32 $2, l2, h2, 0x4051;
prmt.b32 $3, l2, h2, 0x6273;
}}"""
# m1/m2: 0xFF in each byte whose nibble has bit 3 set (prmt's sign-replicate mode on the bit moved to a
# byte's top); lop3 0xD8: m ? b : a, the high half of the table where bit 3 is set.


def decode_asm_for(values: list[float], dtype: torch.dtype) -> str:
    """The decode asm for 16 code values rounded to `dtype` (float16 or bfloat16)."""
    bits = torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    lo, hi = (bits & 0xFF).tolist(), (bits >> 8).tolist()

    def word(t: list[int], j: int) -> str:
        return "0x%08X" % (t[4 * j] | t[4 * j + 1] << 8 | t[4 * j + 2] << 16 | t[4 * j + 3] << 24)

    return _TEMPLATE.format(**{f"L{j}": word(lo, j) for j in range(4)}, **{f"H{j}": word(hi, j) for j in range(4)})


def decode_asm(code: torch.Tensor, dtype: torch.dtype) -> str | None:
    """decode_asm_for the table `code` holds, kept on the tensor (reading a table on the GPU syncs once
    per table and dtype; an in-place change reads it again, except on an inference tensor, which keeps
    no version); None while a CUDA graph is being captured and the table was not read yet."""
    key = (dtype, -1 if code.is_inference() else code._version)
    cache = getattr(code, "_qtune_decode_asm", None)
    if cache is not None and key in cache:
        return cache[key]
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    asm = decode_asm_for(code.tolist(), dtype)
    code._qtune_decode_asm = {**(cache or {}), key: asm}
    return asm


@triton.jit
def decode(byte, DECODE: tl.constexpr, DOT: tl.constexpr):
    """(high nibble's code, low nibble's code) of each byte in DOT, by the asm `decode_asm` made."""
    pair = tl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r", [byte], dtype=tl.int32, is_pure=True, pack=4)
    return (pair & 0xFFFF).to(tl.int16).to(DOT, bitcast=True), (pair >> 16).to(tl.int16).to(DOT, bitcast=True)
