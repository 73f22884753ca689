"""The register decode of packed nibbles (kernels/nibbles.py). On the CPU, the asm text itself runs
through a small interpreter of the PTX it uses (and, shl, shr, prmt with its sign-replicate mode,
lop3), written from the PTX ISA's definitions; on the GPU, the compiled asm in a Triton kernel.
Both against the code table rounded to the compute dtype, every byte value in every byte position."""

import random
import re

import pytest
import torch

from qtune.kernels import nibbles
from qtune.quant.codes import code_table

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLES = [(q, d) for q in ("nf4", "fp4") for d in (torch.bfloat16, torch.float16)]


def _prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 (default mode): byte i of the result is byte (c >> 4i) & 7 of {b, a}, or with bit 3 of
    that selector set, that byte's top bit replicated."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        v = src[sel & 7]
        out |= ((0xFF if v & 0x80 else 0) if sel & 8 else v) << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """lop3.b32: bit i is bit (a_i << 2 | b_i << 1 | c_i) of the truth table."""
    return sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))


def run_asm(asm: str, word: int) -> list[int]:
    """The four output words of the decode asm on input word `word` ($4)."""
    regs = {"$4": word}
    ops = {"and": lambda a, b: a & b, "shr": lambda a, b: a >> b, "shl": lambda a, b: (a << b) & 0xFFFFFFFF,
           "prmt": _prmt, "lop3": _lop3}
    for line in asm.splitlines():
        m = re.fullmatch(r"(\w+)\.b32 (\S+), (.+);", line.strip())
        if m is None:
            assert line.strip() in ("{", "}") or line.strip().startswith(".reg"), line
            continue
        args = [int(t, 0) if t[0].isdigit() else regs[t] for t in (a.strip() for a in m.group(3).split(","))]
        regs[m.group(2)] = ops[m.group(1)](*args)
    return [regs[f"${i}"] for i in range(4)]


def _bits(quant_type: str, dtype: torch.dtype) -> list[int]:
    return (code_table(quant_type).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


@pytest.mark.parametrize("quant_type,dtype", TABLES)
def test_asm_decodes_every_byte_in_every_position(quant_type, dtype):
    asm = nibbles.decode_asm_for(code_table(quant_type).tolist(), dtype)
    want = _bits(quant_type, dtype)
    rng = random.Random(0)
    words = [b * 0x01010101 for b in range(256)] + [rng.getrandbits(32) for _ in range(256)]
    for word in words:
        out = run_asm(asm, word)
        got = [(o & 0xFFFF, o >> 16) for o in out]  # (high nibble's code, low nibble's code) per byte
        bytes_ = [(word >> 8 * i) & 0xFF for i in range(4)]
        assert got == [(want[b >> 4], want[b & 15]) for b in bytes_], hex(word)


def test_decode_asm_is_kept_on_the_table_and_follows_its_changes():
    code = code_table("nf4").clone()
    first = nibbles.decode_asm(code, torch.bfloat16)
    assert nibbles.decode_asm(code, torch.bfloat16) is first  # read once
    assert nibbles.decode_asm(code, torch.float16) != first
    code.mul_(0.5)  # an in-place change bumps the version: read again
    assert nibbles.decode_asm(code, torch.bfloat16) == nibbles.decode_asm_for(code.tolist(), torch.bfloat16) != first


def test_decode_asm_takes_an_inference_tensor():  # a model loaded under torch.inference_mode()
    with torch.inference_mode():
        code = code_table("fp4").clone()
    assert nibbles.decode_asm(code, torch.float16) == nibbles.decode_asm_for(code.tolist(), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,dtype", TABLES)
def test_compiled_decode_matches_the_table(quant_type, dtype):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(p_ptr, hi_ptr, lo_ptr, DECODE: tl.constexpr, DOT: tl.constexpr):
        i = tl.arange(0, 1024)
        hi, lo = nibbles.decode(tl.load(p_ptr + i), DECODE, DOT)
        tl.store(hi_ptr + i, hi)
        tl.store(lo_ptr + i, lo)

    code = code_table(quant_type).to(DEVICE)
    p = torch.randint(0, 256, (1024,), dtype=torch.uint8, device=DEVICE)
    p[:256] = torch.arange(256, device=DEVICE)
    hi = torch.full((1024,), float("nan"), dtype=dtype, device=DEVICE)
    lo = torch.full_like(hi, float("nan"))
    kernel[(1,)](p, hi, lo, DECODE=nibbles.decode_asm(code, dtype),
                 DOT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
    want = code.to(dtype)
    assert torch.equal(hi, want[p.long() >> 4]) and torch.equal(lo, want[p.long() & 15])
