"""Compile qtune's Triton kernels for a GPU target without a GPU (sm_90 and sm_75 by default), to
catch compile errors and see register/shared-memory use before a device run.

    python scripts/compile_check.py
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qtune.kernels import adam8bit as ka
from qtune.kernels import dequant as dq
from qtune.kernels import dropout as kd
from qtune.kernels import rmsnorm as kr
from qtune.kernels import rope as kro
from qtune.kernels import embedding as ke
from qtune.kernels import swiglu as ks
from qtune.kernels import matmul4bit as mm
from qtune.kernels import matmul4bit_tma as mt
from qtune.kernels import nibbles
from qtune.quant.codes import code_table
from qtune.kernels import quantize as kq

P = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32"}


def compile_one(fn, sig: dict, consts: dict, arch: int, warps: int = 4, stages: int = 3, source=ASTSource) -> str:
    sig = {**sig, **{k: "constexpr" for k in consts}}
    try:
        k = triton.compile(source(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        return f"ok shared={k.metadata.shared} regs={getattr(k, 'n_regs', '?')}"
    except Exception as e:  # report and go on
        return f"FAILED {type(e).__name__}: {str(e).splitlines()[-1][:300] if str(e) else ''}"


def compile_tma(dtype: torch.dtype, nested: bool, block_m: int, warps: int, stages: int, kind: int,
                lut: bool = False) -> str:
    """matmul4bit_tma's Gluon kernel (kind 5 or 6, decoding by its shared-memory table or by byte permutes)
    for sm_90, its TMA descriptors' types from stand-in tensors."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    block_n, w_bytes = mt._tile(kind, warps)
    xl, wl = mt._layouts(block_m, block_n, dtype, w_bytes)
    xd = TensorDescriptor.from_tensor(torch.empty(block_m, 5120, dtype=dtype), [block_m, mt.BLOCKSIZE], xl)
    wd = TensorDescriptor.from_tensor(torch.empty(block_n, 2560, dtype=torch.uint8), [block_n, w_bytes], wl)
    pt = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    sig = {"y_ptr": pt, "xd": mangle_type(xd), "wd": mangle_type(wd), "absmax_ptr": "*u8" if nested else "*fp32",
           "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": pt,
           "code_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_ym": "i32"}
    c = {"DECODE": nibbles.decode_asm_for(code_table("nf4").tolist(), dtype), "NESTED": nested, "HAS_BIAS": True,
         "STAGES": stages}
    off = mt._table_offset(kind, block_m, warps, stages, dtype.itemsize) if lut else None
    c["LUT_OFF"] = -1 if off is None else off
    if kind == 5:
        return compile_one(mt._fwd_tma_kernel, sig, {**c, "SCALE": mt.SCALE_ASM[dtype]}, 90, warps, 1,
                           source=GluonASTSource)
    byte_l, am_l = mt.rs_layouts(warps)
    c.update(SCALE=mt.PAIR_SCALE_ASM[dtype], BYTE_L=byte_l, AM_L=am_l)
    return compile_one(mt._fwd_rs_kernel, sig, c, 90, warps, 1, source=GluonASTSource)


def main() -> None:
    for (block_m, warps, stages, _), dt, nested in itertools.product(mt.RS_CONFIGS + mt.CONFIGS,
                                                                     (torch.bfloat16, torch.float16), (True, False)):
        kind = 6 if block_m <= mt.RS_MAX_M else 5
        for lut in (True, False):
            print(f"fwd tma kind {kind} sm_90 {dt} nested={nested} block_m={block_m}{' table' if lut else ''}: "
                  f"{compile_tma(dt, nested, block_m, warps, stages, kind, lut)}")
    for arch, dt, nested in itertools.product((90, 75), (tl.bfloat16, tl.float16, tl.float32), (True, False)):
        if arch == 75 and dt == tl.bfloat16:
            continue
        dot = dt
        prec = "ieee" if dt == tl.float32 else "tf32"
        common = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                  "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32"}
        for bm, bn, w, st, sk, nb in ((16, 64, 4, 3, 8, 1), (16, 64, 4, 3, 4, 4), (32, 128, 4, 4, 2, 2),
                                      (64, 128, 4, 3, 2, 1), (32, 64, 4, 3, 2, 4), (64, 64, 4, 3, 2, 2),
                                      (128, 128, 8, 3, 1, 1)):
            sig = {"x_ptr": P[dt], **common, "bias_ptr": P[dt], "y_ptr": P[dt], "ws_ptr": "*fp32", "lock_ptr": "*i32",
                   "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
            c = {"BS": 64, "NESTED": nested, "HAS_BIAS": True, "DOT": dot, "PRECISION": prec,
                 "LUT": {16: 2, 32: 0, 64: 1}.get(bm, 2), "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk, "NBLK": nb}
            print(f"fwd sm_{arch} {dt} nested={nested} {bm}x{bn} split {sk} nblk {nb}: "
                  f"{compile_one(mm._fwd_kernel, sig, c, arch, w, st)}")
        sig = {"x_ptr": P[dt], **{k: v for k, v in common.items() if k != "code_ptr"}, "bias_ptr": P[dt],
               "y_ptr": P[dt], "ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
        regs = itertools.product(((16, 128, 4, 3, 4), (32, 64, 8, 2, 1), (128, 64, 4, 3, 1)) + (((256, 128, 8, 3, 1),)
                                 if arch >= 80 else ()), (32, 64, 128)) if dt != tl.float32 else ()
        if dt != tl.float32:
            asm = nibbles.decode_asm_for(code_table("nf4").tolist(), torch.float16 if dt == tl.float16 else torch.bfloat16)
        for (bm, bn, w, st, sk), bs in regs:
            c = {"BS": bs, "NESTED": nested, "HAS_BIAS": True, "DECODE": asm, "DOT": dt, "BLOCK_M": bm, "BLOCK_N": bn,
                 "SPLIT_K": sk, "PDL": arch >= 90}
            print(f"fwd regs sm_{arch} {dt} nested={nested} bs={bs} {bm}x{bn} split {sk}: "
                  f"{compile_one(mm._fwd_regs_kernel, sig, c, arch, w, st)}")
        if not nested and dt != tl.float32:
            sig = {"x_ptr": P[dt], "out_ptr": P[dt], "K": "i32", "stride_xm": "i32"}
            c = {"R": 32, "BLOCK": mm.X_ORDER_BLOCK, "PDL": arch >= 90}
            print(f"x order sm_{arch} {dt}: {compile_one(mm._x_order_kernel, sig, c, arch)}")
        sig = {"x_ptr": P[dt], **common, "bias_ptr": P[dt], "y_ptr": P[dt], "ws_ptr": "*fp32", "lock_ptr": "*i32",
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
        for rows, steps, nb, w, lut in ((32, 8, 8, 4, 3), (16, 4, 16, 4, 2), (8, 2, 4, 2, 1)):
            c = {"BS": 64, "NESTED": nested, "HAS_BIAS": True, "LUT": lut, "ROWS": rows, "STEPS": steps, "NB": nb,
                 "SPLIT_K": 10}
            print(f"gemv sm_{arch} {dt} nested={nested} {rows}x{steps} nb {nb} lut {lut}: "
                  f"{compile_one(mm._gemv_kernel, sig, c, arch, w)}")
        sig = {"dy_ptr": P[dt], **common, "dx_ptr": P[dt], "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32",
               "stride_dxm": "i32"}
        c = {"BS": 64, "NESTED": nested, "DOT": dot, "PRECISION": prec, "BLOCK_M": 16, "BLOCK_N": 64}
        print(f"bwd sm_{arch} {dt} nested={nested}: {compile_one(mm._bwd_kernel, sig, c, arch)}")
        sig = {"x_ptr": P[dt], "packed_ptr": "*u8", "absmax_ptr": "*fp32", "t_ptr": "*fp32",
               "mags_ptr": "*u8", "n": "i64", "n_bytes": "i64", "n_blocks": "i64"}
        for fp4 in (False, True):
            c = {"FP4": fp4, "BLOCKSIZE": 64, "NB": 32}
            print(f"quant4 sm_{arch} {dt} fp4={fp4}: {compile_one(kq._quant4_kernel, sig, c, arch)}")
    for dt, nested in itertools.product((tl.bfloat16, tl.float16, tl.float32), (True, False)):
        sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32", "out_ptr": P[dt],
               "n_bytes": "i64", "n": "i64", "n_blocks": "i64", "nested_absmax_ptr": "*fp32",
               "nested_code_ptr": "*fp32", "offset_ptr": "*fp32"}
        for bs in (64, 4096):
            c = {"BLOCKSIZE": bs, "NESTED": nested, "OUT": dt, "NB": max(1, 2048 // bs)}
            print(f"dequant sm_90 {dt} nested={nested} bs={bs}: {compile_one(dq._dequant4_kernel, sig, c, 90)}")
    sig = {"x_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32", "q_ptr": "*u8", "absmax_ptr": "*fp32",
           "n": "i32"}
    print(f"quant8 sm_90: {compile_one(kq._quant8_kernel, sig, {'BLOCKSIZE': 256}, 90)}")
    sig = {n: "*i32" if n == "work_ptr" else "*i64" for n in ("work_ptr", "poff_ptr", "goff_ptr", "numel_ptr",
                                                               "elem_off_ptr", "block_off_ptr")}
    sig = {"work_ptr": sig["work_ptr"], "p_base": "*fp32", **{k: v for k, v in sig.items() if k != "work_ptr"},
           "scal_ptr": "*fp32", "s1_ptr": "*u8", "s2_ptr": "*u8", "a1_ptr": "*fp32", "a2_ptr": "*fp32",
           "map1_ptr": "*fp32", "map2_ptr": "*fp32",
           **{n: "fp32" for n in ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "decay", "l2", "step_size",
                                  "eps_hat")}}
    for arch, dt in itertools.product((90, 75), (tl.float32, tl.bfloat16, tl.float16)):
        if arch == 75 and dt == tl.bfloat16:
            continue
        c = {"P_DTYPE": dt, "EIGHT_BIT": True, "USE_L2": False, "USE_DECAY": True, "PER_TENSOR_STEP": False,
             "ALIGN": 4, "NB": 4, "BLOCK_SIZE": 256}
        s = {**sig, "p_base": P[dt]}
        for shared in (True, False):
            print(f"adam sm_{arch} {dt} shared LUT {shared}: "
                  f"{compile_one(ka._adam_kernel, s, {**c, 'SHARED': shared}, arch)}")

    for arch, dt in itertools.product((90, 75), (tl.float32, tl.bfloat16, tl.float16)):
        if arch == 75 and dt == tl.bfloat16:
            continue
        sig = {"x_ptr": P[dt], "y_ptr": P[dt], "seed_ptr": "*i64", "seed_out_ptr": "*i64", "n": "i32", "salt": "i32",
               "threshold": "i64",
               "scale": "fp32"}
        print(f"dropout sm_{arch} {dt}: "
              f"{compile_one(kd._dropout_kernel, sig, {'DTYPE': dt, 'BLOCK_SIZE': kd.BLOCK, 'WIDE': False}, arch)}")
        sig = {"x_ptr": P[dt], "w_ptr": P[dt], "y_ptr": P[dt], "rstd_ptr": "*fp32", "N": "i32", "stride": "i32",
               "eps": "fp32"}
        print(f"rmsnorm fwd sm_{arch} {dt}: {compile_one(kr._rmsnorm_fwd, sig, {'DTYPE': dt, 'BLOCK': 8192}, arch, 16)}")
        sig = {"dy_ptr": P[dt], "x_ptr": P[dt], "w_ptr": P[dt], "rstd_ptr": "*fp32", "dx_ptr": P[dt], "N": "i32",
               "stride": "i32"}
        print(f"rmsnorm bwd sm_{arch} {dt}: {compile_one(kr._rmsnorm_bwd, sig, {'DTYPE': dt, 'BLOCK': 8192}, arch, 16)}")
        sig = {"x_ptr": P[dt], "y_ptr": P[dt], "cos_ptr": P[dt], "sin_ptr": P[dt],
               **{n: "i32" for n in ("n_rows", "H", "S", "sxb", "sxh", "sxs", "syb", "syh", "sys_", "scb", "scs")}}
        print(f"rope sm_{arch} {dt}: "
              f"{compile_one(kro._rope_kernel, sig, {'SIGN': 1.0, 'HALF': 64, 'DTYPE': dt, 'ROWS': kro.ROWS}, arch)}")
        sig = {"g_ptr": P[dt], "u_ptr": P[dt], "h_ptr": P[dt], "n": "i32"}
        print(f"swiglu fwd sm_{arch} {dt}: {compile_one(ks._swiglu_fwd, sig, {'DTYPE': dt, 'BLOCK': ks.BLOCK}, arch)}")
        sig = {"dh_ptr": P[dt], "g_ptr": P[dt], "u_ptr": P[dt], "dg_ptr": P[dt], "du_ptr": P[dt], "n": "i32"}
        print(f"swiglu bwd sm_{arch} {dt}: {compile_one(ks._swiglu_bwd, sig, {'DTYPE': dt, 'BLOCK': ks.BLOCK}, arch)}")
        sig = {"ids_ptr": "*i64", "w_ptr": P[dt], "out_ptr": P[dt], "D": "i32", "w_stride": "i32"}
        print(f"embedding sm_{arch} {dt}: {compile_one(ke._gather_kernel, sig, {'BLOCK': ke.BLOCK}, arch)}")


if __name__ == "__main__":
    main()
