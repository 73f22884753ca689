"""Hopper's fused dequantize-matmul for 17 to 256 rows of X, in Gluon (Triton's explicit-layout
language): Y^T = deq(W) X^T. A producer warp streams each absmax block's packed bytes of W and X's
matching columns by TMA into a ring of stages; the other warps decode the bytes (nibbles.decode's
asm), fold in the absmax and run the MMA as an asynchronous wgmma while they decode the next block.
From 65 rows (kind 5) the decoded tile of W goes to shared memory for the MMA, and X keeps its own
column order: the decode writes each byte's two codes as the pair of columns they pack. From 17 to 64
rows (kind 6) the bytes are loaded into the MMA's register operand and decoded there, two blocks per
step, and X comes in matmul4bit._x_order's column order (the k pairs a thread holds are contiguous
bytes). Imports torch and triton.

Needs sm_90 (TMA, wgmma), 16-bit X and blocksize 64; `usable` says where it runs, and
matmul4bit.forward falls back to its register-decode kernel elsewhere. Triton's interpreter does not
run Gluon, so the kernels are tested on the GPU only (tests/kernels/test_matmul4bit.py).
"""

from __future__ import annotations

import torch

from .launch import cdiv, launch

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
CONFIGS = ((128, 8, 6, None), (256, 8, 5, None))
MIN_M, MAX_M = 65, 256
# Kind 6's, with 16 * num_warps rows of W per program. Same measure: M=32 37.0 us against 39.3, M=64
# 39.5 against 46.2. Two blocks per step gained 3-4 us over one, 8 stages over 4, 6, 10, 12 or 16, 4
# warps over 8; split-K 2 lost 3-8 us. At M=16 it took 35.5 against 34.3: kind 4 keeps up to 16 rows.
RS_CONFIGS = ((32, 4, 8, 96), (64, 4, 8, 128))
RS_MIN_M, RS_MAX_M = 17, 64
SCALE_ASM = {torch.bfloat16: "mul.rn.bf16x2 $0, $1, $2;", torch.float16: "mul.rn.f16x2 $0, $1, $2;"}


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
def _store_yt(acc, y_ptr, bias_ptr, n0, M, N, stride_ym, HAS_BIAS: gl.constexpr):
    """The (W rows, X rows) tile of Y^T (+ bias) into Y, rounded to Y's dtype."""
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
def _consume(y_ptr, xs, wb, wdec, ready, empty, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
             M, N, stride_ym, n0, blocks, DECODE: gl.constexpr, SCALE: gl.constexpr, NESTED: gl.constexpr,
             HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, acc_l: gl.constexpr):
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
    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=acc_l)
    for k in range(blocks):
        s = k % STAGES
        kn = gl.minimum(k + 1, blocks - 1)  # the absmax loads a block ahead
        stored_n, nested_n = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk + kn, rows, NESTED)
        mbarrier.wait(ready.index(s), (k // STAGES) & 1)
        pair = gl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r", [wb.index(s).load(byte_l)], dtype=gl.int32,
                                         is_pure=True, pack=4)
        am = _absmax(stored, nested, nested_code_ptr, offset, NESTED)
        half = am.to(DOT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        pair = gl.inline_asm_elementwise(SCALE, "=r,r,r", [pair, gl.expand_dims(half | (half << 16), 1)],
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
    _store_yt(acc, y_ptr, bias_ptr, n0, M, N, stride_ym, HAS_BIAS)


@_jit
def _rs_operand(wb_s, am, DECODE: gl.constexpr, DOT: gl.constexpr, byte_l: gl.constexpr, a_l: gl.constexpr):
    """A stage's bytes of W as the wgmma's register operand: each thread loads the bytes of its fragment
    (byte_l), put in k pair order as X's columns are, decodes them and scales each row by its absmax."""
    BN: gl.constexpr = wb_s.shape[0]
    R: gl.constexpr = wb_s.shape[1]
    byte = wb_s.load(byte_l).reshape(BN, 4, R // 8, 2).permute(0, 2, 3, 1).reshape(BN, R)
    pair = gl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r", [byte], dtype=gl.int32, is_pure=True, pack=4)
    even = (pair & 0xFFFF).to(gl.int16).to(DOT, bitcast=True)
    odd = (pair >> 16).to(gl.int16).to(DOT, bitcast=True)
    a = gl.convert_layout(gl.join(even, odd).reshape(BN, 2 * R), a_l, assert_trivial=True)
    return a * gl.expand_dims(am.to(DOT), 1)


@_jit
def _consume_rs(y_ptr, xs, wb, ready, empty, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
                M, N, stride_ym, n0, blocks, DECODE: gl.constexpr, NESTED: gl.constexpr, HAS_BIAS: gl.constexpr,
                STAGES: gl.constexpr, acc_l: gl.constexpr, byte_l: gl.constexpr):
    """Kind 6's consumer warps, two blocks per step (an even number of blocks and of stages): decode
    both into registers, issue both MMAs, then wait for the previous step's two, which releases their
    stages (and the registers they read)."""
    BLOCK_M: gl.constexpr = xs.shape[1]
    BN: gl.constexpr = wb.shape[1]
    R: gl.constexpr = wb.shape[2]
    DOT: gl.constexpr = xs.dtype
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, a_l))
    rows = rn < N
    blk = rn * blocks
    offset = gl.load(offset_ptr) if NESTED else 0.0
    stored0, nested0 = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk, rows, NESTED)
    stored1, nested1 = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk + 1, rows, NESTED)
    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=acc_l)
    a0 = gl.zeros((BN, 2 * R), DOT, layout=a_l)
    a1 = gl.zeros((BN, 2 * R), DOT, layout=a_l)
    for k in range(0, blocks, 2):
        s = k % STAGES
        kn = gl.minimum(k + 2, blocks - 2)  # the absmax loads a step ahead
        stored0_n, nested0_n = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk + kn, rows, NESTED)
        stored1_n, nested1_n = _stored_absmax(absmax_ptr, nested_absmax_ptr, blk + kn + 1, rows, NESTED)
        mbarrier.wait(ready.index(s), (k // STAGES) & 1)
        mbarrier.wait(ready.index(s + 1), (k // STAGES) & 1)
        b0 = _rs_operand(wb.index(s), _absmax(stored0, nested0, nested_code_ptr, offset, NESTED), DECODE, DOT, byte_l,
                         a_l)
        b1 = _rs_operand(wb.index(s + 1), _absmax(stored1, nested1, nested_code_ptr, offset, NESTED), DECODE, DOT,
                         byte_l, a_l)
        acc = warpgroup_mma(b0, xs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(b1, xs.index(s + 1).permute((1, 0)), acc, is_async=True)
        acc, a0, a1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, a0, a1))
        gl.thread_barrier()
        if k >= 2:
            mbarrier.arrive(empty.index((k - 2) % STAGES))
            mbarrier.arrive(empty.index((k - 1) % STAGES))
        a0, a1 = b0, b1
        stored0, nested0, stored1, nested1 = stored0_n, nested0_n, stored1_n, nested1_n
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _store_yt(acc, y_ptr, bias_ptr, n0, M, N, stride_ym, HAS_BIAS)


@_jit
def _fwd_tma_kernel(y_ptr, xd, wd, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, M, N, K,
                    stride_ym, DECODE: gl.constexpr, SCALE: gl.constexpr, NESTED: gl.constexpr,
                    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, BYTE_L: gl.constexpr):
    """Program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W against all of X's rows (the TMA box);
    kind 6 where BYTE_L (rs_byte_layout) is given, else kind 5."""
    BLOCK_M: gl.constexpr = xd.block_type.shape[0]
    BN: gl.constexpr = wd.block_type.shape[0]
    R: gl.constexpr = wd.block_type.shape[1]
    n0 = gl.program_id(0) * BN
    blocks = K // (2 * R)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BLOCK_M, 16])
    xs = gl.allocate_shared_memory(xd.dtype, [STAGES, BLOCK_M, 2 * R], xd.layout)
    wb = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, R], wd.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(ready.index(q), count=1)
        mbarrier.init(empty.index(q), count=1)
    if BYTE_L is None:
        wdec = gl.allocate_shared_memory(xd.dtype, [2, BN, 2 * R], gl.NVMMASharedLayout(4 * R, 16))
        gl.warp_specialize([(_consume, (y_ptr, xs, wb, wdec, ready, empty, absmax_ptr, nested_absmax_ptr,
                                        nested_code_ptr, offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE,
                                        SCALE, NESTED, HAS_BIAS, STAGES, acc_l)),
                            (_produce, (xd, wd, xs, wb, ready, empty, n0, blocks, STAGES))], [1], [24])
    else:
        gl.warp_specialize([(_consume_rs, (y_ptr, xs, wb, ready, empty, absmax_ptr, nested_absmax_ptr,
                                           nested_code_ptr, offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE,
                                           NESTED, HAS_BIAS, STAGES, acc_l, BYTE_L)),
                            (_produce, (xd, wd, xs, wb, ready, empty, n0, blocks, STAGES))], [1], [24])


def usable(x: torch.Tensor, packed: torch.Tensor, blocksize: int, kind: int = 5) -> bool:
    """Whether kind 5 (MIN_M to MAX_M rows) or kind 6 (RS_MIN_M to RS_MAX_M rows, an even number of
    absmax blocks per row) takes the product: Gluon's Hopper API here, 16-bit X with 16-byte aligned
    rows, blocksize 64 and a 16-byte aligned packed weight (TMA's rules)."""
    M, K = x.shape
    lo, hi, whole = (MIN_M, MAX_M, BLOCKSIZE) if kind == 5 else (RS_MIN_M, RS_MAX_M, 2 * BLOCKSIZE)
    return (gluon is not None and x.dtype in SCALE_ASM and blocksize == BLOCKSIZE and lo <= M <= hi
            and K % whole == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and packed.data_ptr() % 16 == 0)


_LAYOUTS: dict = {}


def _layouts(block_m: int, block_n: int, dtype: torch.dtype):
    """The NVMMA shared layouts of X's and W's TMA boxes (cached: building them is host time)."""
    key = (block_m, block_n, dtype)
    if key not in _LAYOUTS:
        dot = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
        _LAYOUTS[key] = (gl.NVMMASharedLayout.get_default_for([block_m, BLOCKSIZE], dot),
                         gl.NVMMASharedLayout.get_default_for([block_n, BLOCKSIZE // 2], gl.uint8))
    return _LAYOUTS[key]


_BYTE_LAYOUTS: dict = {}


def rs_byte_layout(warps: int):
    """Kind 6's layout of a stage's (16 * warps, 32) bytes: lane t % 4 of warp w holds bytes [8(t % 4),
    8(t % 4) + 8) of rows 16w + t / 4 and 16w + t / 4 + 8, the bytes whose codes its wgmma fragment
    holds once put in k pair order."""
    if warps not in _BYTE_LAYOUTS:
        _BYTE_LAYOUTS[warps] = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]], lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16 << i, 0] for i in range(warps.bit_length() - 1)], block_bases=[],
            shape=[16 * warps, BLOCKSIZE // 2])
    return _BYTE_LAYOUTS[warps]


def launch_config(M: int) -> tuple[int, int, int, int | None]:
    """(BLOCK_M, num_warps, stages, maxnreg) for M rows of X: RS_CONFIGS up to RS_MAX_M (kind 6), CONFIGS
    above (kind 5)."""
    return next(c for c in RS_CONFIGS + CONFIGS if M <= c[0])


def forward(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_args: tuple, nested: bool, N: int,
            bias: torch.Tensor | None, decode: str, y: torch.Tensor, config: tuple, kind: int = 5) -> torch.Tensor:
    """y = x @ deq(W)^T (+ bias), as matmul4bit.forward (where `usable`): nested_args its (nested absmax,
    nested code, offset) or stand-ins, `decode` nibbles.decode_asm's for x's dtype, config (BLOCK_M,
    num_warps, stages) as launch_config gives (its maxnreg follows BLOCK_M). Kind 6 takes x in
    matmul4bit._x_order's column order."""
    M, K = x.shape
    block_m, warps, stages = config
    if kind == 6 and stages % 2:
        raise ValueError(f"kind 6 takes two blocks per step: stages must be even, not {stages}")
    block_n = BLOCK_N if kind == 5 else 16 * warps
    x_layout, w_layout = _layouts(block_m, block_n, x.dtype)
    xd = TensorDescriptor(x, [M, K], [x.stride(0), 1], [block_m, BLOCKSIZE], x_layout)
    wd = TensorDescriptor(packed.view(torch.uint8), [N, K // 2], [K // 2, 1], [block_n, BLOCKSIZE // 2], w_layout)
    launch(_fwd_tma_kernel, (cdiv(N, block_n),), y, xd, wd, absmax, *nested_args, bias if bias is not None else y, M,
           N, K, y.stride(0), DECODE=decode, SCALE=SCALE_ASM[x.dtype], NESTED=nested, HAS_BIAS=bias is not None,
           STAGES=stages, BYTE_L=rs_byte_layout(warps) if kind == 6 else None, num_warps=warps, num_stages=1,
           maxnreg=launch_config(block_m)[3])
    return y
