"""Hopper's fused dequantize-matmul for 65 to 256 rows of X, in Gluon (Triton's explicit-layout
language): Y^T = deq(W) X^T with both MMA operands in shared memory. A producer warp streams each
absmax block's packed bytes of W and X's matching columns by TMA into a ring of stages; the other
warps decode the bytes (nibbles.decode's asm), fold in the absmax, store the tile of W for the MMA
and run it as an asynchronous wgmma while they decode the next block. X keeps its own column order:
the decode writes each byte's two codes as the pair of columns they pack. Imports torch and triton.

Needs sm_90 (TMA, wgmma), 16-bit X and blocksize 64; `usable` says where it runs, and
matmul4bit.forward falls back to its register-decode kernel elsewhere. Triton's interpreter does not
run Gluon, so the kernel is tested on the GPU only (tests/kernels/test_matmul4bit.py).
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
# (BLOCK_M, num_warps, stages) by rows of X. One H100, flushed CUDA graphs against the register-decode
# kernel (+ X's column order) in the same process: M=128 57.8-58.0 us with 6 stages (58.7-58.8 with 5)
# against 73.4-76.0; M=256 73.7-74.1 with 4 or 5 stages against 91.5-91.8. At M=16-64 this kernel was
# slower (55-64 us against 34.6-46.0 at its best split-K), and split-K 2 at M=128 took 76.9.
CONFIGS = ((128, 8, 6), (256, 8, 5))
MIN_M, MAX_M = 65, 256
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
def _consume(y_ptr, xs, wb, wdec, ready, empty, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr,
             M, N, stride_ym, n0, blocks, DECODE: gl.constexpr, SCALE: gl.constexpr, NESTED: gl.constexpr,
             HAS_BIAS: gl.constexpr, STAGES: gl.constexpr):
    """The consumer warps: per block, decode and scale W's tile into wdec (two buffers: a warpgroup
    rewrites one once its own MMA two blocks back is done), then the MMA, one left in flight. Each
    warp decodes the 16 rows its own MMA reads; the barrier after the stores also tells that every
    MMA of block k - 2 is done, which releases that block's stage to the producer."""
    NW: gl.constexpr = gl.num_warps()
    BLOCK_M: gl.constexpr = xs.shape[1]
    BN: gl.constexpr = wb.shape[1]
    R: gl.constexpr = wb.shape[2]
    DOT: gl.constexpr = xs.dtype
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BLOCK_M, 16])
    byte_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [NW, 1], [1, 0])  # 16 bytes of one row per thread
    pair_l: gl.constexpr = gl.NVMMASharedLayout(4 * R, 32)  # wdec's bytes as one 32-bit word per byte's codes
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, byte_l))
    rows = rn < N
    blk = rn * blocks
    offset = gl.load(offset_ptr) if NESTED else 0.0
    stored = gl.load(absmax_ptr + blk, mask=rows, other=0)
    nested = gl.load(nested_absmax_ptr + blk // 256, mask=rows, other=0.0) if NESTED else 0.0
    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=acc_l)
    for k in range(blocks):
        s = k % STAGES
        kn = gl.minimum(k + 1, blocks - 1)  # the absmax loads a block ahead
        stored_n = gl.load(absmax_ptr + blk + kn, mask=rows, other=0)
        nested_n = gl.load(nested_absmax_ptr + (blk + kn) // 256, mask=rows, other=0.0) if NESTED else 0.0
        mbarrier.wait(ready.index(s), (k // STAGES) & 1)
        pair = gl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r", [wb.index(s).load(byte_l)], dtype=gl.int32,
                                         is_pure=True, pack=4)
        am = gl.load(nested_code_ptr + stored.to(gl.int32)) * nested + offset if NESTED else stored
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
    rw = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, acc_l))
    rx = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l))
    if HAS_BIAS:
        acc += gl.expand_dims(gl.load(bias_ptr + rw, mask=rw < N, other=0.0).to(gl.float32), 1)
    mask = gl.expand_dims(rx < M, 0) & gl.expand_dims(rw < N, 1)
    gl.store(y_ptr + gl.expand_dims(rx, 0) * stride_ym + gl.expand_dims(rw, 1), acc.to(DOT), mask=mask)


@_jit
def _fwd_tma_kernel(y_ptr, xd, wd, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, M, N, K,
                    stride_ym, DECODE: gl.constexpr, SCALE: gl.constexpr, NESTED: gl.constexpr,
                    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr):
    """Program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W against all of X's rows (the TMA box)."""
    BLOCK_M: gl.constexpr = xd.block_type.shape[0]
    BN: gl.constexpr = wd.block_type.shape[0]
    R: gl.constexpr = wd.block_type.shape[1]
    n0 = gl.program_id(0) * BN
    blocks = K // (2 * R)
    xs = gl.allocate_shared_memory(xd.dtype, [STAGES, BLOCK_M, 2 * R], xd.layout)
    wb = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, R], wd.layout)
    wdec = gl.allocate_shared_memory(xd.dtype, [2, BN, 2 * R], gl.NVMMASharedLayout(4 * R, 16))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(ready.index(q), count=1)
        mbarrier.init(empty.index(q), count=1)
    gl.warp_specialize([(_consume, (y_ptr, xs, wb, wdec, ready, empty, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                    offset_ptr, bias_ptr, M, N, stride_ym, n0, blocks, DECODE, SCALE, NESTED,
                                    HAS_BIAS, STAGES)),
                        (_produce, (xd, wd, xs, wb, ready, empty, n0, blocks, STAGES))], [1], [24])


def usable(x: torch.Tensor, packed: torch.Tensor, blocksize: int) -> bool:
    """Whether this kernel takes the product: Gluon's Hopper API here, 16-bit X of MIN_M to MAX_M rows
    with 16-byte aligned rows, blocksize 64 and a 16-byte aligned packed weight (TMA's rules)."""
    M, K = x.shape
    return (gluon is not None and x.dtype in SCALE_ASM and blocksize == BLOCKSIZE and MIN_M <= M <= MAX_M
            and K % BLOCKSIZE == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and packed.data_ptr() % 16 == 0)


_LAYOUTS: dict = {}


def _layouts(block_m: int, dtype: torch.dtype):
    """The NVMMA shared layouts of X's and W's TMA boxes (cached: building them is host time)."""
    key = (block_m, dtype)
    if key not in _LAYOUTS:
        dot = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
        _LAYOUTS[key] = (gl.NVMMASharedLayout.get_default_for([block_m, BLOCKSIZE], dot),
                         gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCKSIZE // 2], gl.uint8))
    return _LAYOUTS[key]


def launch_config(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, stages) from CONFIGS for M rows of X."""
    return CONFIGS[0 if M <= CONFIGS[0][0] else 1]


def forward(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_args: tuple, nested: bool, N: int,
            bias: torch.Tensor | None, decode: str, y: torch.Tensor, config: tuple[int, int, int]) -> torch.Tensor:
    """y = x @ deq(W)^T (+ bias), as matmul4bit.forward (where `usable`): nested_args its (nested absmax,
    nested code, offset) or stand-ins, `decode` nibbles.decode_asm's for x's dtype, config (BLOCK_M,
    num_warps, stages) as launch_config gives."""
    M, K = x.shape
    block_m, warps, stages = config
    x_layout, w_layout = _layouts(block_m, x.dtype)
    xd = TensorDescriptor(x, [M, K], [x.stride(0), 1], [block_m, BLOCKSIZE], x_layout)
    wd = TensorDescriptor(packed.view(torch.uint8), [N, K // 2], [K // 2, 1], [BLOCK_N, BLOCKSIZE // 2], w_layout)
    launch(_fwd_tma_kernel, (cdiv(N, BLOCK_N),), y, xd, wd, absmax, *nested_args, bias if bias is not None else y, M,
           N, K, y.stride(0), DECODE=decode, SCALE=SCALE_ASM[x.dtype], NESTED=nested, HAS_BIAS=bias is not None,
           STAGES=stages, num_warps=warps, num_stages=1)
    return y
