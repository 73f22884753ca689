"""Hopper's fused dequantize-matmul for 2 to 256 rows of X, in Gluon (Triton's explicit-layout
language): Y^T = deq(W) X^T. A producer warp streams W's packed bytes and X's matching columns by TMA
into a ring of stages; the other warps decode the bytes (through a byte -> codes table in shared
memory on Triton 3.6, else by nibbles.decode's byte permutes), fold in the absmax and run the MMA as an
asynchronous wgmma while they decode the next block. From 65 rows (kind 5) each stage is one absmax
block, and the decoded tile of W goes to shared memory for the MMA; X keeps its own column order: the
decode writes each byte's two codes as the pair of columns they pack. Up to 64 rows (kind 6) each stage
is four blocks (128 bytes of each row of W: whole 128-byte lines), loaded into the MMA's register
operand and decoded there, and X comes in matmul4bit._x_order's column order (the k pairs a thread
holds are contiguous bytes), its copy overlapped by a dependent launch. Imports torch and triton.

Needs sm_90 (TMA, wgmma), 16-bit X and blocksize 64; `usable` says where it runs, and
matmul4bit.forward falls back to its register-decode kernel elsewhere. Triton's interpreter does not
run Gluon, so the kernels are tested on the GPU only (tests/kernels/test_matmul4bit.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import HostDesc, Plan, cdiv, launch, recall, remember, stream

try:  # Gluon's Hopper API as of Triton 3.6
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # another Triton: matmul4bit.forward keeps its Triton kernels
    gluon = None

BLOCKSIZE = 64  # one absmax block of K per step: 32 packed bytes per row of W
BLOCK_N = 128  # rows of W per program: two warpgroups of 64
# Kind 5's (BLOCK_M, num_warps, stages, maxnreg) by rows of X. One H100, flushed CUDA graphs against the
# register-decode kernel (+ X's column order) in the same process: M=128 57.8-58.0 us with 6 stages
# (58.7-58.8 with 5) against 73.4-76.0; M=256 73.7-74.1 with 4 or 5 stages against 91.5-91.8. At M=16-64
# this kernel was slower (55-64 us against 34.6-46.0 at its best split-K), and split-K 2 at M=128 took 76.9.
# With the decode table: M=128 53.5-54.5 (permutes 57.5-58.3), M=256 70.4-71.5 with 4 stages (the most
# that fit beside the table; permutes 70.8-74.8 with 4 or 5).
CONFIGS = ((128, 8, 6, None), (256, 8, 4, None))
MIN_M, MAX_M = 65, 256
# Kind 6's, with 16 * num_warps rows of W per program and RS_BLOCKS absmax blocks per stage. Same measure
# (one H100, 13824x5120), the table decode, kernel alone: M=16 25.2 us with 5 stages (25.6-26.7 with 3, 26.3-27.1
# with 8 warps), M=32 26.2-26.6 (8 warps 26.8-28.8, 5 stages 32.8-33.1), M=64 31.5 (3 stages 31.7-31.9, 4
# warps 38.0); byte permutes 29.7-29.8, 32.4-34.1 and 36.9-37.4 (docs/benchmarks.md, fifteenth session).
RS_CONFIGS = ((16, 4, 5, 128), (32, 4, 3, 128), (64, 8, 4, None))
RS_MIN_M, RS_MAX_M = 2, 64
RS_BLOCKS = 4
SCALE_ASM = {torch.bfloat16: "mul.rn.bf16x2 $0, $1, $2;", torch.float16: "mul.rn.f16x2 $0, $1, $2;"}
# Kind 6's: two 16-bit outputs packed in $0 from two 32-bit inputs each ($1 = $2, $3 = $4)
PAIR_SCALE_ASM = {dtype: asm.replace("$2", "$3") for dtype, asm in SCALE_ASM.items()}
# Kinds 5 and 6 decode through a table in shared memory: one 32-bit word per byte value (its two codes, as
# nibbles.decode's asm gives them) in each of the 32 banks, so a warp's 32 lookups are one access without
# bank conflicts. 4 integer instructions, 4 multiply-adds and 4 loads decode 8 codes, against 21 integer
# instructions for nibbles' byte permutes, which bounded kind 6. The table's address is its offset in
# Triton's shared memory (_lut_offset), known for Triton 3.6's allocator only; elsewhere the permutes.
LUT_DECODE = triton.__version__.startswith("3.6.")
LUT_BYTES = 256 * 32 * 4
SMEM_BYTES = 227 * 1024 - 1024  # sm_90's shared memory per block, less room for the barriers and scratch
LUT_ASM = tl.constexpr("""{ .reg .b32 a, b, c, d;
and.b32 a, $4, 0xFF;
prmt.b32 b, $4, 0, 0x4441;
prmt.b32 c, $4, 0, 0x4442;
shr.u32 d, $4, 24;
mad.lo.u32 a, a, 128, $5;
mad.lo.u32 b, b, 128, $5;
mad.lo.u32 c, c, 128, $5;
mad.lo.u32 d, d, 128, $5;
ld.shared.b32 $0, [a];
ld.shared.b32 $1, [b];
ld.shared.b32 $2, [c];
ld.shared.b32 $3, [d];
}""")  # $0-$3: the words of the 4 bytes in $4, from the thread's column of the table at $5
SMEM_ASM = tl.constexpr("mov.b32 $0, global_smem; // $1")  # Triton's shared memory (its extern array)
LANE_ASM = tl.constexpr("mov.u32 $0, %laneid; // $1")
LOAD_ASM = tl.constexpr("ld.shared.b32 $0, [$1];")


def _jit(fn):
    return gluon.jit(fn) if gluon is not None else fn


@_jit
def _produce(xd, wd, xs, wb, ready, empty, n0, blocks, STAGES: gl.constexpr):
    """The producer warp: block k's X columns and W bytes into stage k % STAGES once the consumers
    have released it (the release of block k - STAGES)."""
    R: gl.constexpr = wd.block_type.shape[1]
    for k in range(blocks):
        s = k % STAGES
        if k >= STAGES:
            mbarrier.wait(empty.index(s), ((k // STAGES) - 1) & 1)
        mbarrier.expect(ready.index(s), xd.block_type.nbytes + wd.block_type.nbytes)
        tma.async_copy_global_to_shared(xd, [0, k * 2 * R], ready.index(s), xs.index(s))
        tma.async_copy_global_to_shared(wd, [n0, k * R], ready.index(s), wb.index(s))


@_jit
def _stored_absmax(absmax_ptr, nested_absmax_ptr, blk, rows, NESTED: gl.constexpr):
    """The stored absmax of blocks `blk` (uint8 codes when nested) and their nested absmax (0 if not)."""
    stored = gl.load(absmax_ptr + blk, mask=rows, other=0)
    nested = gl.load(nested_absmax_ptr + blk // 256, mask=rows, other=0.0) if NESTED else 0.0
    return stored, nested


@_jit
def _absmax(stored, nested, nested_code_ptr, offset, NESTED: gl.constexpr):
    """float32 absmax from _stored_absmax's pair, as the reference decodes it."""
    return gl.load(nested_code_ptr + stored.to(gl.int32)) * nested + offset if NESTED else stored


@_jit
def _pair_word(am, DOT: gl.constexpr):
    """The absmax rounded to DOT, twice in one 32-bit word: the second operand of SCALE_ASM's multiply."""
    half = am.to(DOT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return half | (half << 16)


@_jit
def _store_yt(acc, y_ptr, bias_ptr, n0, M, N, stride_ym, HAS_BIAS: gl.constexpr, misplaced=0):
    """The (W rows, X rows) tile of Y^T (+ bias) into Y, rounded to Y's dtype; NaN where the decode table
    was `misplaced` (_fill_lut: never with Triton 3.6), not a silently wrong product."""
    if misplaced:
        acc = gl.full_like(acc, float("nan"))
    BN: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    rw = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, acc.type.layout))
    rx = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc.type.layout))
    if HAS_BIAS:
        acc += gl.expand_dims(gl.load(bias_ptr + rw, mask=rw < N, other=0.0).to(gl.float32), 1)
    mask = gl.expand_dims(rx < M, 0) & gl.expand_dims(rw < N, 1)
    gl.store(y_ptr + gl.expand_dims(rx, 0) * stride_ym + gl.expand_dims(rw, 1), acc.to(y_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _consume(y_ptr, xs, wb, wdec, code_ptr, ready, empty, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
             offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE: gl.constexpr, SCALE: gl.constexpr,
             NESTED: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, acc_l: gl.constexpr,
             LUT_OFF: gl.constexpr):
    """The consumer warps: per block, decode and scale W's tile into wdec (two buffers: a warpgroup
    rewrites one once its own MMA two blocks back is done), then the MMA, one left in flight. Each
    warp decodes the 16 rows its own MMA reads; the barrier after the stores also tells that every
    MMA of block k - 2 is done, which releases that block's stage to the producer."""
    BLOCK_M: gl.constexpr = xs.shape[1]
    BN: gl.constexpr = wb.shape[1]
    R: gl.constexpr = wb.shape[2]
    DOT: gl.constexpr = xs.dtype
    byte_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [gl.num_warps(), 1], [1, 0])  # 16 bytes of a row per thread
    pair_l: gl.constexpr = gl.NVMMASharedLayout(4 * R, 32)  # wdec's bytes as one 32-bit word per byte's codes
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, byte_l))
    rows = rn < N
    blk = rn * blocks
    offset = gl.load(offset_ptr) if NESTED else 0.0
    stored, nested = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk, rows, NESTED)
    misplaced = 0
    if LUT_OFF >= 0:  # the table: wdec's tiles 2 and 3, 128 rows each
        half_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        misplaced = _fill_lut(wdec.index(2)._reinterpret(gl.int32, [128, 32], half_l), code_ptr, LUT_OFF, DOT)
        misplaced |= _fill_lut(wdec.index(3)._reinterpret(gl.int32, [128, 32], half_l), code_ptr, LUT_OFF, DOT, 128)
    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=acc_l)
    for k in range(blocks):
        s = k % STAGES
        kn = gl.minimum(k + 1, blocks - 1)  # the absmax loads a block ahead
        stored_n, nested_n = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk + kn, rows, NESTED)
        mbarrier.wait(ready.index(s), (k // STAGES) & 1)
        pair = _decode_pairs(wb.index(s).load(byte_l), DECODE, LUT_OFF)
        am = _absmax(stored, nested, nested_code_ptr, offset, NESTED)
        pair = gl.inline_asm_elementwise(SCALE, "=r,r,r", [pair, gl.expand_dims(_pair_word(am, DOT), 1)],
                                         dtype=gl.int32, is_pure=True, pack=1)
        wdec.index(k % 2)._reinterpret(gl.int32, [BN, R], pair_l).store(pair)
        fence_async_shared()
        gl.thread_barrier()
        if k >= 2:
            mbarrier.arrive(empty.index((k - 2) % STAGES))
        acc = warpgroup_mma(wdec.index(k % 2), xs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        stored = stored_n
        nested = nested_n
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _store_yt(acc, y_ptr, bias_ptr, n0, M, N, stride_ym, HAS_BIAS, misplaced)


@_jit
def _gdc_wait():
    """Wait for the kernel this one was launched behind (programmatic dependent launch): X's copy."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@_jit
def _produce_rs(xd, wd, xs, wb, ready, empty, n0, steps, STAGES: gl.constexpr):
    """Kind 6's producer warp: stage i % STAGES gets W's bytes of blocks [i G, (i + 1) G) as one box
    and X's columns as G boxes. W's first stages are requested before X's copy is waited for."""
    RB: gl.constexpr = wd.block_type.shape[1]
    G: gl.constexpr = RB // (xd.block_type.shape[1] // 2)
    nbytes: gl.constexpr = G * xd.block_type.nbytes + wd.block_type.nbytes
    for i in range(gl.minimum(steps, STAGES)):
        mbarrier.expect(ready.index(i), nbytes)
        tma.async_copy_global_to_shared(wd, [n0, i * RB], ready.index(i), wb.index(i))
    _gdc_wait()
    for i in range(steps):
        s = i % STAGES
        if i >= STAGES:
            mbarrier.wait(empty.index(s), ((i // STAGES) - 1) & 1)
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(wd, [n0, i * RB], ready.index(s), wb.index(s))
        for j in gl.static_range(G):
            tma.async_copy_global_to_shared(xd, [0, (i * G + j) * xd.block_type.shape[1]], ready.index(s),
                                            xs.index(s * G + j))


@_jit
def _stage_stored(absmax_ptr, nested_absmax_ptr, rn, rows, q, blocks, i, NESTED: gl.constexpr):
    """Stage i's stored absmax: nested, each row's 4 uint8 codes as one int32 word and the row's nested
    absmax (4 blocks never straddle a group of 256); else the (rows, 4) float32 absmax."""
    if NESTED:
        words = absmax_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        return (gl.load(words + rn * (blocks // 4) + i, mask=rows, other=0),
                gl.load(nested_absmax_ptr + (rn * blocks + 4 * i) // 256, mask=rows, other=0.0))
    else:
        blk = gl.expand_dims(rn * blocks + 4 * i, 1) + gl.expand_dims(q, 0)
        return gl.load(absmax_ptr + blk, mask=gl.expand_dims(rows, 1), other=0.0), 0.0


@_jit
def _stage_absmax(stored, nested, q, nested_code_ptr, offset, NESTED: gl.constexpr):
    """float32 (rows, 4) absmax of a stage from _stage_stored's pair, as the reference decodes it."""
    if NESTED:
        code = (gl.expand_dims(stored, 1) >> (8 * gl.expand_dims(q, 0))) & 0xFF
        return _absmax(code, gl.expand_dims(nested, 1), nested_code_ptr, offset, NESTED)
    else:
        return stored


@_jit
def _smem(like, offset: gl.constexpr, LANE: gl.constexpr):
    """Triton's shared memory address + offset (+ 4 lane id: the thread's bank) in the layout of `like`."""
    base = gl.inline_asm_elementwise(SMEM_ASM, "=r,r", [like], dtype=gl.int32, is_pure=True, pack=1) + offset
    if LANE:
        base += 4 * gl.inline_asm_elementwise(LANE_ASM, "=r,r", [like], dtype=gl.int32, is_pure=True, pack=1)
    return base


@_jit
def _fill_lut(lut, code_ptr, LUT_OFF: gl.constexpr, DOT: gl.constexpr, ROW0: gl.constexpr = 0):
    """Rows ROW0 to ROW0 + rows of `lut` of the decode table (rows: byte values; each row one word in each
    bank) from the 16 codes, read back through the address the decode uses: 1 where any word differs
    (the table is elsewhere), else 0."""
    ROWS: gl.constexpr = lut.shape[0]
    lut_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [gl.num_warps(), 1], [1, 0])
    v = gl.expand_dims(ROW0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, lut_l)), 1)
    col = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, lut_l)), 0)
    hi = gl.load(code_ptr + (v >> 4)).to(DOT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    lo = gl.load(code_ptr + (v & 15)).to(DOT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    words = (hi | (lo << 16)) + gl.zeros_like(col)  # the high nibble's code in the low half, as nibbles'
    lut.store(words)
    gl.thread_barrier()
    addr = _smem(words, LUT_OFF, LANE=False) + v * 128 + col * 4
    back = gl.inline_asm_elementwise(LOAD_ASM, "=r,r", [addr], dtype=gl.int32, is_pure=False, pack=1)
    return gl.max(gl.max((back != words).to(gl.int32), axis=1), axis=0)


@_jit
def _decode_pairs(byte, DECODE: gl.constexpr, LUT_OFF: gl.constexpr):
    """Each byte's two codes as one 32-bit word (the high nibble's in the low half): through the table at
    LUT_OFF, or by nibbles' byte permutes (DECODE) where it is -1."""
    if LUT_OFF >= 0:
        column = _smem(gl.zeros_like(byte).to(gl.int32), LUT_OFF, LANE=True)
        return gl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,r,r,r,r,r", [byte, column], dtype=gl.int32,
                                         is_pure=True, pack=4)
    return gl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r", [byte], dtype=gl.int32, is_pure=True, pack=4)


@_jit
def _rs_operand(byte, am, DECODE: gl.constexpr, SCALE: gl.constexpr, DOT: gl.constexpr, a_l: gl.constexpr,
                LUT_OFF: gl.constexpr):
    """A block's bytes (as loaded: storage order) as the wgmma's register operand: decoded to 32-bit code
    pairs (by the table at LUT_OFF, or nibbles' permutes where it is -1), relabelled to k pair order
    (whole registers), each pair scaled by its row's absmax in one bf16x2/f16x2 multiply that also makes it
    the operand's word."""
    BN: gl.constexpr = byte.shape[0]
    R: gl.constexpr = byte.shape[1]
    pair = _decode_pairs(byte, DECODE, LUT_OFF).reshape(BN, 4, R // 8, 2).permute(0, 2, 3, 1).reshape(BN, R)
    scale = gl.expand_dims(_pair_word(gl.convert_layout(am, gl.SliceLayout(1, pair.type.layout)), DOT), 1)
    scale = scale + gl.zeros_like(pair)
    a = gl.inline_asm_elementwise(SCALE, "=r,r,r,r,r", [gl.join(pair, pair).reshape(BN, 2 * R),
                                                         gl.join(scale, scale).reshape(BN, 2 * R)],
                                  dtype=DOT.value, is_pure=True, pack=2)
    return gl.convert_layout(a, a_l, assert_trivial=True)


@_jit
def _consume_rs(y_ptr, xs, wb, lut, code_ptr, ready, empty, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE: gl.constexpr, SCALE: gl.constexpr,
                NESTED: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, acc_l: gl.constexpr,
                byte_l: gl.constexpr, am_l: gl.constexpr, LUT_OFF: gl.constexpr):
    """Kind 6's consumer warps, a stage (4 blocks) at a time, two blocks per step: decode both into
    registers, issue both MMAs, then wait for the previous step's two (their register operands kept
    live until then); the first step's wait finishes the previous stage, which releases it."""
    BLOCK_M: gl.constexpr = xs.shape[1]
    BN: gl.constexpr = wb.shape[1]
    BK: gl.constexpr = xs.shape[2]
    DOT: gl.constexpr = xs.dtype
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, am_l))
    rows = rn < N
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, am_l))
    offset = gl.load(offset_ptr) if NESTED else 0.0
    steps = blocks // 4
    misplaced = _fill_lut(lut, code_ptr, LUT_OFF, DOT) if LUT_OFF >= 0 else 0
    stored, nested = _stage_stored(absmax_ptr, nested_absmax_ptr, rn, rows, q, blocks, 0, NESTED)
    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=acc_l)
    p0 = gl.zeros((BN, BK), DOT, layout=a_l)
    p1 = gl.zeros((BN, BK), DOT, layout=a_l)
    for i in range(steps):
        s = i % STAGES
        stored_n, nested_n = _stage_stored(absmax_ptr, nested_absmax_ptr, rn, rows, q, blocks,
                                           gl.minimum(i + 1, steps - 1), NESTED)  # a stage ahead
        am_e, am_o = gl.split(_stage_absmax(stored, nested, q, nested_code_ptr, offset, NESTED).reshape(BN, 2, 2))
        am0, am2 = gl.split(am_e)
        am1, am3 = gl.split(am_o)
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        byte = wb.index(s).load(byte_l).reshape(BN, 4, 32).permute(0, 2, 1).reshape(BN, 32, 2, 2)
        byte_e, byte_o = gl.split(byte)
        b0, b2 = gl.split(byte_e)
        b1, b3 = gl.split(byte_o)
        c0 = _rs_operand(b0, am0, DECODE, SCALE, DOT, a_l, LUT_OFF)
        c1 = _rs_operand(b1, am1, DECODE, SCALE, DOT, a_l, LUT_OFF)
        acc = warpgroup_mma(c0, xs.index(4 * s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(c1, xs.index(4 * s + 1).permute((1, 0)), acc, is_async=True)
        acc, p0, p1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, p0, p1))
        gl.thread_barrier()
        if i > 0:
            mbarrier.arrive(empty.index((i - 1) % STAGES))
        c2 = _rs_operand(b2, am2, DECODE, SCALE, DOT, a_l, LUT_OFF)
        c3 = _rs_operand(b3, am3, DECODE, SCALE, DOT, a_l, LUT_OFF)
        acc = warpgroup_mma(c2, xs.index(4 * s + 2).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(c3, xs.index(4 * s + 3).permute((1, 0)), acc, is_async=True)
        acc, c0, c1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, c0, c1))
        p0, p1 = c2, c3
        stored, nested = stored_n, nested_n
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _store_yt(acc, y_ptr, bias_ptr, n0, M, N, stride_ym, HAS_BIAS, misplaced)


@_jit
def _ring(STAGES: gl.constexpr):
    """The ring's mbarriers: ready[s] (the stage's bytes have landed), empty[s] (the consumers are done
    with it)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(ready.index(q), count=1)
        mbarrier.init(empty.index(q), count=1)
    return ready, empty


@_jit
def _fwd_tma_kernel(y_ptr, xd, wd, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, code_ptr, M, N,
                    K, stride_ym, DECODE: gl.constexpr, SCALE: gl.constexpr, NESTED: gl.constexpr,
                    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, LUT_OFF: gl.constexpr):
    """Kind 5. Program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W against all of X's rows (the TMA
    box), one absmax block per stage. The decode table, where there is one, shares an allocation with the
    two decoded tiles (two more tiles' bytes), which are as large as it."""
    BLOCK_M: gl.constexpr = xd.block_type.shape[0]
    BN: gl.constexpr = wd.block_type.shape[0]
    R: gl.constexpr = wd.block_type.shape[1]
    n0 = gl.program_id(0) * BN
    blocks = K // (2 * R)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BLOCK_M, 16])
    xs = gl.allocate_shared_memory(xd.dtype, [STAGES, BLOCK_M, 2 * R], xd.layout)
    wb = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, R], wd.layout)
    ready, empty = _ring(STAGES)
    wdec = gl.allocate_shared_memory(xd.dtype, [4 if LUT_OFF >= 0 else 2, BN, 2 * R],
                                     gl.NVMMASharedLayout(4 * R, 16))
    gl.warp_specialize([(_consume, (y_ptr, xs, wb, wdec, code_ptr, ready, empty, absmax_ptr, nested_absmax_ptr,
                                    nested_code_ptr, offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE,
                                    SCALE, NESTED, HAS_BIAS, STAGES, acc_l, LUT_OFF)),
                        (_produce, (xd, wd, xs, wb, ready, empty, n0, blocks, STAGES))], [1], [24])
    wdec._keep_alive()  # the table's loads are asm, which Triton's liveness does not see


@_jit
def _fwd_rs_kernel(y_ptr, xd, wd, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, code_ptr, M, N,
                   K, stride_ym, DECODE: gl.constexpr, SCALE: gl.constexpr, NESTED: gl.constexpr,
                   HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, BYTE_L: gl.constexpr, AM_L: gl.constexpr,
                   LUT_OFF: gl.constexpr):
    """Kind 6. Program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W against all of X's rows, RS_BLOCKS
    absmax blocks per stage."""
    BLOCK_M: gl.constexpr = xd.block_type.shape[0]
    BN: gl.constexpr = wd.block_type.shape[0]
    RB: gl.constexpr = wd.block_type.shape[1]
    G: gl.constexpr = RB // (xd.block_type.shape[1] // 2)
    n0 = gl.program_id(0) * BN
    blocks = K // xd.block_type.shape[1]
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BLOCK_M, 16])
    xs = gl.allocate_shared_memory(xd.dtype, [STAGES * G, BLOCK_M, xd.block_type.shape[1]], xd.layout)
    lut = gl.allocate_shared_memory(gl.int32, [256 if LUT_OFF >= 0 else 1, 32],
                                    gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    wb = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, RB], wd.layout)
    ready, empty = _ring(STAGES)
    gl.warp_specialize([(_consume_rs, (y_ptr, xs, wb, lut, code_ptr, ready, empty, absmax_ptr, nested_absmax_ptr,
                                       nested_code_ptr, offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE,
                                       SCALE, NESTED, HAS_BIAS, STAGES, acc_l, BYTE_L, AM_L, LUT_OFF)),
                        (_produce_rs, (xd, wd, xs, wb, ready, empty, n0, blocks // G, STAGES))], [1], [24])
    lut._keep_alive()  # the decode's loads are asm, which Triton's liveness does not see: the table lives to here


def usable(x: torch.Tensor, packed: torch.Tensor, blocksize: int, kind: int = 5,
           absmax: torch.Tensor | None = None) -> bool:
    """Whether kind 5 (MIN_M to MAX_M rows) or kind 6 (RS_MIN_M to RS_MAX_M rows, whole stages of
    RS_BLOCKS absmax blocks per row, the absmax 4-byte aligned: kind 6 reads a stage's codes as one
    word) takes the product: Gluon's Hopper API here, 16-bit X with 16-byte aligned rows, blocksize 64
    and a 16-byte aligned packed weight (TMA's rules)."""
    M, K = x.shape
    lo, hi, whole = (MIN_M, MAX_M, BLOCKSIZE) if kind == 5 else (RS_MIN_M, RS_MAX_M, RS_BLOCKS * BLOCKSIZE)
    return (gluon is not None and x.dtype in SCALE_ASM and blocksize == BLOCKSIZE and lo <= M <= hi
            and K % whole == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and packed.data_ptr() % 16 == 0 and (kind == 5 or absmax is None or absmax.data_ptr() % 4 == 0))


_LAYOUTS: dict = {}


def _layouts(block_m: int, block_n: int, dtype: torch.dtype, w_bytes: int = BLOCKSIZE // 2):
    """The NVMMA shared layouts of X's and W's TMA boxes, W's `w_bytes` wide (cached: building them is
    host time)."""
    key = (block_m, block_n, dtype, w_bytes)
    if key not in _LAYOUTS:
        dot = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
        _LAYOUTS[key] = (gl.NVMMASharedLayout.get_default_for([block_m, BLOCKSIZE], dot),
                         gl.NVMMASharedLayout.get_default_for([block_n, w_bytes], gl.uint8))
    return _LAYOUTS[key]


_RS_LAYOUTS: dict = {}


def rs_layouts(warps: int):
    """Kind 6's register layouts. Bytes, a stage's (16 warps, 128): lane t % 4 of warp w holds bytes
    [8(t % 4), 8(t % 4) + 8) of each block of rows 16w + t / 4 and 16w + t / 4 + 8, the bytes whose codes
    its wgmma fragment holds once put in k pair order. Absmax, (16 warps, 4): the same rows, a stage's 4
    blocks in registers."""
    if warps not in _RS_LAYOUTS:
        wb = [[16 << i, 0] for i in range(warps.bit_length() - 1)]
        lanes = [[1, 0], [2, 0], [4, 0]]
        _RS_LAYOUTS[warps] = (
            gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0], [0, 32], [0, 64]],
                                       lane_bases=[[0, 8], [0, 16]] + lanes, warp_bases=wb, block_bases=[],
                                       shape=[16 * warps, RS_BLOCKS * BLOCKSIZE // 2]),
            gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 0], [0, 0]] + lanes,
                                       warp_bases=wb, block_bases=[], shape=[16 * warps, RS_BLOCKS]))
    return _RS_LAYOUTS[warps]


def _lut_offset(*sizes: int, buffer: int = LUT_BYTES, within: int = 0) -> int | None:
    """The decode table's offset in shared memory, `within` its `buffer`-byte allocation, beside ring
    buffers of `sizes` bytes: Triton 3.6 places buffers live for the whole kernel largest first, one
    after another, so the allocation follows those larger than it. None where one is as large (equals
    come in no set order) or the table does not fit."""
    if buffer in sizes or sum(sizes) + buffer > SMEM_BYTES:
        return None
    return sum(s for s in sizes if s > buffer) + within


def _tile(kind: int, warps: int) -> tuple[int, int]:
    """(rows of W per program, bytes of each row per stage) of kind 5 or 6."""
    return (BLOCK_N, BLOCKSIZE // 2) if kind == 5 else (16 * warps, RS_BLOCKS * BLOCKSIZE // 2)


@functools.lru_cache(maxsize=None)
def _table_offset(kind: int, block_m: int, warps: int, stages: int, itemsize: int = 2) -> int | None:
    """_lut_offset for kind 5 or 6's rings at this launch shape (kind 5's table: the second half of its
    decoded tiles' allocation)."""
    block_n, w_bytes = _tile(kind, warps)
    sizes = (block_m * BLOCKSIZE * itemsize * stages * (1 if kind == 5 else RS_BLOCKS), block_n * w_bytes * stages)
    return _lut_offset(*sizes, buffer=2 * LUT_BYTES, within=LUT_BYTES) if kind == 5 else _lut_offset(*sizes)


def launch_config(M: int) -> tuple[int, int, int, int | None]:
    """(BLOCK_M, num_warps, stages, maxnreg) for M rows of X: RS_CONFIGS up to RS_MAX_M (kind 6), CONFIGS
    above (kind 5)."""
    return next(c for c in RS_CONFIGS + CONFIGS if M <= c[0])


# Launch plans by everything a launch of kind 5 or 6 depends on but X's and Y's addresses.
_PLANS: dict[tuple, Plan] = {}


def forward(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_args: tuple, nested: bool, N: int,
            bias: torch.Tensor | None, decode: str, y: torch.Tensor, config: tuple, kind: int = 5,
            code: torch.Tensor | None = None, lut: bool | None = None) -> torch.Tensor:
    """y = x @ deq(W)^T (+ bias), as matmul4bit.forward (where `usable`): nested_args its (nested absmax,
    nested code, offset) or stand-ins, config (BLOCK_M, num_warps, stages) as launch_config gives (its
    maxnreg follows BLOCK_M), `decode` nibbles.decode_asm's for x's dtype. Kind 6 takes x in
    matmul4bit._x_order's column order, copied by the kernel just launched (it is launched behind it).
    Both decode through a table of `code` (lut None: where LUT_DECODE) or by `decode`. After the first
    launch for a weight and shape, later ones take its plan: X's TMA map is the only one encoded."""
    M, K = x.shape
    use_table = LUT_DECODE if lut is None else lut
    key = (kind, config, use_table, decode, x.dtype, M, K, x.stride(0), N, y.stride(0), y.data_ptr() % 16,
           packed.data_ptr(), absmax.data_ptr(), *[t.data_ptr() for t in nested_args], nested,
           0 if bias is None else bias.data_ptr(), 0 if code is None else code.data_ptr(), x.device.index)
    plan = recall(_PLANS, key)
    if plan is not None:  # Y's address first, then X's descriptor
        plan(stream(x.device.index),
             (0, [y.data_ptr(), *plan.launcher.encode(HostDesc(x, [M, K], [x.stride(0), 1]), 1)]))
        return y
    block_m, warps, stages = config
    kernel = _fwd_tma_kernel if kind == 5 else _fwd_rs_kernel
    block_n, w_bytes = _tile(kind, warps)
    x_layout, w_layout = _layouts(block_m, block_n, x.dtype, w_bytes)
    xd = TensorDescriptor(x, [M, K], [x.stride(0), 1], [block_m, BLOCKSIZE], x_layout)
    wd = TensorDescriptor(packed.view(torch.uint8), [N, K // 2], [K // 2, 1], [block_n, w_bytes], w_layout)
    off = _table_offset(kind, block_m, warps, stages, x.element_size()) if use_table else None
    args = (y, xd, wd, absmax, *nested_args, bias if bias is not None else y, code if off is not None else y, M, N,
            K, y.stride(0))
    consts = dict(NESTED=nested, HAS_BIAS=bias is not None, STAGES=stages, DECODE=decode,
                  LUT_OFF=-1 if off is None else off)
    if kind == 5:
        consts.update(SCALE=SCALE_ASM[x.dtype])
    else:
        byte_l, am_l = rs_layouts(warps)
        consts.update(SCALE=PAIR_SCALE_ASM[x.dtype], BYTE_L=byte_l, AM_L=am_l)
    grid = (cdiv(N, block_n),)
    launcher = launch(kernel, grid, *args, num_warps=warps, num_stages=1, maxnreg=launch_config(block_m)[3],
                      launch_pdl=kind == 6, **consts)
    if launcher is not None and sorted(launcher.metas) == [1, 2]:
        remember(_PLANS, key, Plan.of(launcher, grid, args, consts))
    return y
