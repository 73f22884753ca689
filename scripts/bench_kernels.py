"""4-bit (and 8-bit) kernels against bitsandbytes and plain bf16, in one process on one GPU.

    python scripts/bench_kernels.py            # the table; JSON to $OUT/bench_kernels.json
    python scripts/bench_kernels.py --sweep    # launch configs of the fused kernels per M

Copy bandwidth (a device-to-device copy); the read floor (a kernel that only reads the packed bytes
of the 13824x5120 weight, timed as the forward's CUDA graphs are, and again after a clean flush with
the M=1 layers); quantize and dequantize (NF4 + double quant, bf16;
GB/s counts packed bytes + bf16 bytes); forward Y = X @ W^T at M = 1 to 16384
(K=5120, N=13824, bf16) for qtune's Linear4bit (its dispatch), the fused kernel and
dequantize + cuBLAS alone, bitsandbytes' Linear4bit and bf16 nn.Linear; forward + input gradient
at M = 1, 16, 512, 1024, 4096; M=4096 and 16384 forward and forward + dX again against bf16 in alternating
rounds (median ratio) and call by call; the int8 forward (scripts/bench_int8.py). Medians of CUDA-event timings
(triton.testing.do_bench), which include the host's launch time where it exceeds the kernels';
up to M=2048 the three layers also replayed in CUDA graphs with L2 flushed before each call (graph_ms:
the GPU's time alone). The sweeps rank launch configs by graph_ms.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from qtune.kernels import matmul4bit as mm
from qtune.nn import Linear4bit
from qtune.quant import quantize_4bit
from qtune.quant.functional import dequantize_4bit
from qtune.quant.reference import dequantize_4bit as reference_dequant

N, K = 13824, 5120


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return 2 * a.numel() / t / 1e6  # GB/s


def bench_formats(rows: list, bw: float) -> None:
    import bitsandbytes.functional as F

    for shape in ((13824, 5120), (28672, 8192), (4096, 4096)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = quantize_4bit(w, 64, "nf4", True)
        pb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        nbytes = packed.numel() + state.absmax.numel() + w.numel() * 2
        t_q = bench(lambda: dequantize_4bit(packed, state, torch.bfloat16))
        t_r = bench(lambda: reference_dequant(packed, state, torch.bfloat16))
        t_b = bench(lambda: F.dequantize_4bit(pb, sb))
        assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), reference_dequant(packed, state, torch.bfloat16))
        rows.append({"op": "dequantize", "shape": shape, "qtune_ms": t_q, "reference_ms": t_r, "bnb_ms": t_b,
                     "qtune_gbs": nbytes / t_q / 1e6})
        print(f"dequantize {shape}: qtune {t_q * 1e3:.1f} us ({nbytes / t_q / 1e6:.0f} GB/s, "
              f"{nbytes / t_q / 1e6 / bw:.0%} of copy), torch reference {t_r * 1e3:.0f} us, bitsandbytes "
              f"{t_b * 1e3:.1f} us -> {t_b / t_q:.2f}x bitsandbytes")
        t_q = bench(lambda: quantize_4bit(w, 64, "nf4", True))
        t_b = bench(lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        rows.append({"op": "quantize", "shape": shape, "qtune_ms": t_q, "bnb_ms": t_b})
        print(f"quantize   {shape}: qtune {t_q * 1e3:.1f} us, bitsandbytes {t_b * 1e3:.1f} us "
              f"-> {t_b / t_q:.2f}x bitsandbytes")


def layers(n: int = N, k: int = K):
    """bf16 nn.Linear (k -> n), and its weight in qtune's and bitsandbytes' Linear4bit (NF4 + double quant)."""
    import bitsandbytes as bnb

    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin, double_quant=True)
    b = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    b.load_state_dict(lin.state_dict())
    return lin, q, b.cuda()


def bench_matmul(rows: list) -> None:
    lin, q, b = layers()
    s = q.quant_state
    # 32: the register decode's last row count; 128: sm_90's TMA kernel; 512-2048: dequantize + cuBLAS on few rows
    for m in (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            t_q = bench(lambda: q(x))
            t_k = bench(lambda: mm.forward(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors,
                                           config=_config_for(m))) if m <= 256 else None
            t_g = bench(lambda: mm.gemv(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors)) if m <= 16 else None
            t_d = bench(lambda: torch.nn.functional.linear(x, dequantize_4bit(q.weight, s, torch.bfloat16)))
            t_b = bench(lambda: b(x))
            t_f = bench(lambda: lin(x))
        layers_now = {"qtune": lambda: q(x), "bnb": lambda: b(x), "bf16": lambda: lin(x)}
        graphs = _graph_times(layers_now) if m <= 2048 else {}
        rows.append({"op": "forward", "M": m, "qtune_ms": t_q, "fused_ms": t_k, "gemv_ms": t_g,
                     "dequant_cublas_ms": t_d, "bnb_ms": t_b, "bf16_ms": t_f,
                     **{f"graph_{k}_ms": v for k, v in graphs.items()}})
        alt = (f"gemv {t_g * 1e3:7.1f}, " if t_g else "") + (f"fused {t_k * 1e3:7.1f}, " if t_k else "")
        print(f"forward M={m:5}: qtune {t_q * 1e3:7.1f} us ({alt}dequantize+cuBLAS "
              f"{t_d * 1e3:7.1f}), bitsandbytes {t_b * 1e3:7.1f} us, bf16 {t_f * 1e3:7.1f} us "
              f"-> {t_b / t_q:.2f}x bitsandbytes, {t_f / t_q:.2f}x bf16")
        if graphs.get("qtune") and graphs.get("bnb"):
            print(f"  in CUDA graphs: qtune {graphs['qtune'] * 1e3:7.1f} us, bitsandbytes {graphs['bnb'] * 1e3:7.1f} us, "
                  f"bf16 {graphs['bf16'] * 1e3:7.1f} us -> {graphs['bnb'] / graphs['qtune']:.2f}x bitsandbytes, "
                  f"{graphs['bf16'] / graphs['qtune']:.2f}x bf16")
    for m in (1, 16, 512, 1024, 4096):  # forward + input gradient
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, N, device="cuda", dtype=torch.bfloat16)
        times = {}
        for name, layer in (("qtune", q), ("bnb", b), ("bf16", lin)):
            lin.weight.requires_grad_(False)
            times[name] = bench(lambda: torch.autograd.grad(layer(x), x, dy))
        rows.append({"op": "forward+dX", "M": m, **{f"{k}_ms": v for k, v in times.items()}})
        print(f"fwd+dX  M={m:5}: qtune {times['qtune'] * 1e3:7.1f} us, bitsandbytes {times['bnb'] * 1e3:7.1f} us, "
              f"bf16 {times['bf16'] * 1e3:7.1f} us -> {times['bnb'] / times['qtune']:.2f}x bitsandbytes, "
              f"{times['bf16'] / times['qtune']:.2f}x bf16")
    bench_large(rows, q, lin)


def bench_large(rows: list, q, lin, rounds: int = 5) -> None:
    """The large-M targets against bf16 in alternating rounds. bf16's own time moved by up to 16%
    within one process (docs/benchmarks.md), more than the 5-7% the targets allow, so each round
    times qtune then bf16 back to back, and the ratio printed is the median of the rounds' ratios:
    by do_bench, and in flushed CUDA graphs (the GPU's time, without the host's Python before the
    first launch that do_bench's flush leaves the GPU waiting on). Also call by call (paired_ratio)."""
    x4 = torch.randn(4096, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4096, N, device="cuda", dtype=torch.bfloat16)
    cases = {f"forward M={m}": _no_grad_call(torch.randn(m, K, device="cuda", dtype=torch.bfloat16))
             for m in (4096, 16384)}
    cases["fwd+dX M=4096"] = lambda layer: torch.autograd.grad(layer(x4), x4, dy)
    for name, call in cases.items():
        times: dict = {"qtune": [], "bf16": [], "graph_qtune": [], "graph_bf16": [], "paired": []}
        for _ in range(rounds):
            for who, layer in (("qtune", q), ("bf16", lin)):
                times[who].append(bench(lambda: call(layer)))
                times[f"graph_{who}"].append(graph_ms(lambda: call(layer), calls=5, replays=5))
            times["paired"].append(paired_ratio(lambda: call(q), lambda: call(lin)))
        ratio = {kind: statistics.median([a / b for a, b in zip(times[f"{kind}qtune"], times[f"{kind}bf16"])])
                 for kind in ("", "graph_")}
        paired = times.pop("paired")
        rows.append({"op": "large vs bf16", "case": name, **{f"{k}_ms": v for k, v in times.items()},
                     "ratio": ratio[""], "graph_ratio": ratio["graph_"], "paired_ratios": paired})
        print(f"{name} over {rounds} alternating rounds: qtune / bf16 median {ratio['']:.3f}x by do_bench "
              f"(qtune {_span(times['qtune'])} us, bf16 {_span(times['bf16'])}), {ratio['graph_']:.3f}x in "
              f"flushed graphs (qtune {_span(times['graph_qtune'])}, bf16 {_span(times['graph_bf16'])}), "
              f"{statistics.median(paired):.3f}x call by call ({', '.join(f'{r:.3f}' for r in paired)})")


def paired_ratio(fa, fb, pairs: int = 40) -> float:
    """Median over pairs of fa's time / fb's, the two alternating call by call (so both run at the same
    clocks), each timed by events after do_bench's flush."""
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(pairs + 3)]
    for ev in events:
        for fn, (start, end) in ((fa, ev[:2]), (fb, ev[2:])):
            _dirty_flush()
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize()
    return statistics.median(ev[0].elapsed_time(ev[1]) / ev[2].elapsed_time(ev[3]) for ev in events[3:])


def _no_grad_call(x: torch.Tensor):
    def call(layer):
        with torch.no_grad():
            return layer(x)
    return call


def _span(ms: list) -> str:
    return f"{min(ms) * 1e3:.1f}-{max(ms) * 1e3:.1f}"


@triton.jit
def _read_kernel(w_ptr, out_ptr, n_rows, WORDS: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                 STEPS: tl.constexpr):
    """XOR of a (ROWS * STEPS, CHUNK) tile of int32 words: reads the bytes and nothing else."""
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    acc = tl.zeros((ROWS, CHUNK), tl.int32)
    for s in tl.range(STEPS, num_stages=3):
        r = tl.program_id(0) * ROWS * STEPS + s * ROWS + tl.arange(0, ROWS)
        acc ^= tl.load(w_ptr + r.to(tl.int64)[:, None] * WORDS + cols[None, :],
                       mask=(r < n_rows)[:, None] & (cols < WORDS)[None, :], other=0)
    tl.store(out_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * ROWS + tl.arange(0, ROWS),
             tl.sum(acc, 1))


def bench_floor(rows: list) -> None:
    """The GEMV's floor as measured here: a kernel that only reads a 13824x5120 weight's packed bytes
    (best of a few launch shapes), in flushed CUDA graphs as the forward table times M=1. Again after a
    clean flush (L2 left holding read lines, none to write back), with the M=1 layers timed the same way."""
    words = torch.randint(-2**31, 2**31 - 1, (N, K // 8), dtype=torch.int32, device="cuda")
    out = torch.empty(2**20, dtype=torch.int32, device="cuda")
    nbytes = words.numel() * 4
    shapes = ((128, 2, 8, 1), (128, 2, 16, 1), (128, 8, 8, 2), (256, 4, 4, 4), (256, 8, 8, 4), (1024, 2, 8, 2))
    for flush in (_dirty_flush, _clean_flush):
        best = (float("inf"), None)
        for chunk, r, steps, warps in shapes:
            grid = (triton.cdiv(N, r * steps), triton.cdiv(K // 8, chunk))
            t = graph_ms(lambda: _read_kernel[grid](words, out, N, WORDS=K // 8, CHUNK=chunk, ROWS=r, STEPS=steps,
                                                    num_warps=warps), flush=flush)
            best = min(best, (t, (chunk, r, steps, warps)))
        rows.append({"op": "read_floor", "flush": flush.__name__, "bytes": nbytes, "graph_ms": best[0],
                     "config": best[1]})
        print(f"read floor ({flush.__doc__}): the packed bytes of {N}x{K} ({nbytes / 1e6:.1f} MB) read and XORed "
              f"in {best[0] * 1e3:.1f} us in flushed CUDA graphs ({nbytes / best[0] / 1e6:.0f} GB/s; words per "
              f"row, rows per step, steps, warps {best[1]})")
    _, q, b = layers()
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        t = {name: graph_ms(lambda: layer(x), flush=_clean_flush) for name, layer in (("qtune", q), ("bnb", b))}
    rows.append({"op": "forward", "M": 1, "flush": "_clean_flush", **{f"graph_{k}_ms": v for k, v in t.items()}})
    print(f"forward M=1 after a clean flush: qtune {t['qtune'] * 1e3:.1f} us, bitsandbytes {t['bnb'] * 1e3:.1f} us "
          f"-> {t['bnb'] / t['qtune']:.2f}x (2.5x needs {t['bnb'] / 2.5 * 1e3:.1f} us)")


@functools.cache
def _flush_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    """256 MB to flush L2 with, and a sink for the clean flush's sums."""
    return (torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"),
            torch.empty(2**13, dtype=torch.int32, device="cuda"))


def _dirty_flush() -> None:
    """zeros written, as do_bench's flush"""
    _flush_buffers()[0].zero_()


def _clean_flush() -> None:
    """256 MB read"""
    buf, sink = _flush_buffers()
    _read_kernel[(2**12, 1)](buf.view(torch.int32).view(2**16, 1024), sink, 2**16, WORDS=1024, CHUNK=1024, ROWS=2,
                             STEPS=8, num_warps=4)


def graph_ms(fn, calls: int = 20, replays: int = 10, flush=_dirty_flush) -> float:
    """Median ms of one call of fn replayed in a CUDA graph, L2 flushed before each call as do_bench
    does (a 13824x5120 weight's 36 MB would otherwise stay in the H100's 50 MB L2): the GPU's time
    without the host's launch time. Graphs of (flush, fn) and of the flush alone, the difference."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles, and allocates what later calls reuse, outside the capture
        flush()
        graphs = []
        for body in ((flush, fn), (flush,)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(calls):
                    for f in body:
                        f()
            graphs.append(g)
        times = []
        for g in graphs:
            g.replay()  # warm
            runs = []
            for _ in range(replays):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                g.replay()
                end.record(stream)
                end.synchronize()
                runs.append(start.elapsed_time(end))
            times.append(sorted(runs)[replays // 2])
    torch.cuda.current_stream().wait_stream(stream)
    return (times[0] - times[1]) / calls


def _graph_times(fns: dict) -> dict:
    """graph_ms of each function (None where capture fails)."""
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = graph_ms(fn)
        except Exception as e:  # not capturable
            print(f"  {name} in a CUDA graph: {type(e).__name__} {e}", file=sys.stderr)
            times[name] = None
    return times


def _candidates(m: int) -> list[tuple[int, int, int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, LUT kind, SPLIT_K, NBLK) to try at m rows (LUT kind:
    0 registers, 1 L1, 2 byte pairs in shared memory, 3 nibbles from shared memory (matmul4bit._lookup);
    4 decoded in registers as the MMA's operand, Y^T tiles (_fwd_regs_kernel, one tile of up to 256 rows);
    5 on sm_90 from 65 rows and 6 from 2 to 64, matmul4bit_tma's kernels, by their warps and stages)."""
    bm = max(16, min(256, 1 << (m - 1).bit_length()))
    regs = [(bm, bn, w, st, 4, sk, 1) for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4) for sk in (1, 2, 4)
            if m <= 256 and not (bn == 64 and w == 8) and not (bm >= 128 and sk == 4)]
    tma = [(bm, mm.matmul4bit_tma.BLOCK_N, 8, st, 5, 1, 1) for st in (3, 4, 5, 6)
           if mm.matmul4bit_tma.MIN_M <= m <= mm.matmul4bit_tma.MAX_M and (bm == 128 or st <= 5)]
    tma += [(bm, 16 * w, w, st, 6, 1, 1) for w in (4, 8) for st in (2, 3, 4, 5)
            if mm.matmul4bit_tma.RS_MIN_M <= m <= mm.matmul4bit_tma.RS_MAX_M]
    return tma + regs + _lookup_candidates(m)


def _lookup_candidates(m: int) -> list[tuple[int, int, int, int, int, int, int]]:
    if m <= 16:
        return [(16, bn, 4, st, lut, sk, nb) for bn in (32, 64) for st in (3, 4) for lut in (0, 2, 3) for sk in (1, 2, 4, 8)
                for nb in (1, 2, 4)] + [(16, bn, 4, 1, 1, sk, 1) for bn in (32, 64) for sk in (1, 4)]
    if m >= 256:  # one tile of M where it fits, so that each weight tile is decoded once
        return [(bm, bn, w, 3, 2, sk, nb) for bm in (64, 128, 256) for bn in (64, 128) for w in ((8,) if bm >= 128 else (4,))
                for sk in (1, 2) for nb in (1, 2) if bm * bn <= 256 * 128]
    bms = {32: (32,), 64: (64,), 128: (64, 128)}.get(m, (128,))
    return [(bm, bn, w, st, lut, sk, nb) for bm in bms for bn in (64, 128) for w in ((4, 8) if bm >= 128 else (4,))
            for st in (3, 4) for lut in (0, 2, 3) for sk in (1, 2, 4) for nb in (1, 2) if bm * bn <= 256 * 128] + \
        [(bm, 64, 4, 1, 1, 1, 1) for bm in bms]


def _gemv_candidates(m: int) -> list[tuple[int, int, int, int, int]]:
    """(ROWS, STEPS, NB, num_warps, LUT kind) for the CUDA-core GEMV: 16 to 64 packed bytes per
    thread and step (fewer: fewer registers, more programs per SM)."""
    return [(r, st, nb, w, lut) for r in (2, 4, 8, 16) for st in (8, 16, 32) for nb in (8, 16) for w in (1, 2, 4, 8)
            for lut in (1, 3) if 16 <= r * nb * 32 // (32 * w) <= 64 and (lut == 3 or st == 16)]


def sweep_gemv(rows: list, ms: tuple[int, ...] = (1, 2, 4, 8, 16)) -> None:
    """The GEMV's launch configs at few rows, against the tiled fused kernel and dequantize + cuBLAS."""
    _, q, _ = layers()
    s = q.quant_state
    for m in ms:
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        want = mm.forward(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors, config=_config_for(m)).float()
        t_k = graph_ms(lambda: mm.forward(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors,
                                          config=_config_for(m)))
        t_d = graph_ms(lambda: torch.nn.functional.linear(x, dequantize_4bit(q.weight, s, torch.bfloat16)))
        best, times = (1e9, None), {}
        for cfg in _gemv_candidates(m):
            try:
                y = mm.gemv(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors, config=cfg)
                assert ((y.float() - want).norm() / want.norm()) < 2e-2, cfg
                t = graph_ms(lambda: mm.gemv(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors, config=cfg))
            except Exception as e:  # out of resources
                print(f"  gemv M={m} {cfg}: {type(e).__name__} {e}", file=sys.stderr)
                continue
            best, times[cfg] = min(best, (t, cfg)), t
        rows.append({"op": "sweep_gemv", "M": m, "best": best, "tiled_ms": t_k, "dequant_cublas_ms": t_d})
        print(f"M={m:4}: gemv best {best[0] * 1e3:6.1f} us {best[1]} vs tiled fused {t_k * 1e3:6.1f} us, "
              f"dequantize+cuBLAS {t_d * 1e3:6.1f} us; next: "
              + ", ".join(f"{c} {t * 1e3:.1f}" for c, t in sorted(times.items(), key=lambda kv: kv[1])[1:6]), flush=True)


def sweep_formats(rows: list, bw: float) -> None:
    """Launch shapes of dequantize (bytes per program, warps) and quantize (values per program, warps)
    at two real sizes, bf16 NF4 with double quantization."""
    from qtune.kernels import dequant as kd
    from qtune.kernels import quantize as kq

    for shape in ((13824, 5120), (28672, 8192)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = quantize_4bit(w, 64, "nf4", True)
        nbytes = packed.numel() + state.absmax.numel() + w.numel() * 2
        times = {}
        for cfg in [(b, wp) for b in (1024, 2048, 4096, 8192) for wp in (4, 8)]:
            times[cfg] = do_bench(lambda: kd.dequantize_4bit(packed, state.absmax, state.code, state.shape, 64,
                                                            torch.bfloat16, state.nested_tensors, config=cfg),
                                  warmup=10, rep=50, return_mode="median")
        best = min(times, key=times.get)
        print(f"dequantize {shape}: best {times[best] * 1e3:.1f} us {best} ({nbytes / times[best] / 1e6 / bw:.0%} of "
              f"copy); default {times[(kd.BYTES_PER_PROGRAM, kd.NUM_WARPS)] * 1e3:.1f} us; all: "
              + ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in times.items()), flush=True)
        default = (kq.VALUES_PER_PROGRAM, kq.NUM_WARPS)
        qt = {}
        for cfg in [(v, wp) for v in (1024, 2048, 4096) for wp in (4, 8)]:
            kq.VALUES_PER_PROGRAM, kq.NUM_WARPS = cfg
            qt[cfg] = bench(lambda: quantize_4bit(w, 64, "nf4", True))
        kq.VALUES_PER_PROGRAM, kq.NUM_WARPS = default
        qbest = min(qt, key=qt.get)
        print(f"quantize   {shape}: best {qt[qbest] * 1e3:.1f} us {qbest}; default {qt[default] * 1e3:.1f} us; all: "
              + ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in qt.items()), flush=True)
        rows.append({"op": "sweep_formats", "shape": shape, "dequant": {str(k): v for k, v in times.items()},
                     "quantize": {str(k): v for k, v in qt.items()}})


def _config_for(m: int):
    return mm._config(m, torch.bfloat16, mm._hopper(torch.device("cuda")))


def sweep(rows: list, ms: tuple[int, ...] = (1, 16, 32, 64, 128, 256), gemv_ms: tuple[int, ...] = (1, 2, 4, 8, 16)) -> None:
    """Launch configs of the fused kernels against dequantize + cuBLAS, per M."""
    sweep_gemv(rows, gemv_ms)
    _, q, _ = layers()
    s = q.quant_state
    for m in ms:
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(m, N, device="cuda", dtype=torch.bfloat16)
        t_d = graph_ms(lambda: torch.nn.functional.linear(x, dequantize_4bit(q.weight, s, torch.bfloat16)))
        t_db = graph_ms(lambda: dy @ dequantize_4bit(q.weight, s, torch.bfloat16))
        best = {}
        for cfg in _candidates(m):
            kinds = [("fwd", lambda: mm.forward(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors, config=cfg))]
            if m <= 64 and cfg[1] <= 64 and cfg[4] != 4 and cfg[5:] == (1, 1):  # the input-gradient kernel has neither
                kinds.append(("bwd", lambda: mm.backward(dy, q.weight, s.absmax, s.code, K, 64, s.nested_tensors,
                                                         config=cfg)))
            for kind, fn in kinds:
                try:
                    t = graph_ms(fn)
                except Exception as e:  # out of shared memory / registers
                    print(f"  {kind} M={m} {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if t < best.get(kind, (1e9,))[0]:
                    best[kind] = (t, cfg)
        rows.append({"op": "sweep", "M": m, "dequant_cublas_ms": t_d, "dequant_cublas_bwd_ms": t_db,
                     **{f"best_{k}": v for k, v in best.items()}})
        print(f"M={m:4}: fwd best {best['fwd'][0] * 1e3:6.1f} us {best['fwd'][1]} vs dequantize+cuBLAS "
              f"{t_d * 1e3:6.1f} us" + (f"; bwd best {best['bwd'][0] * 1e3:6.1f} us {best['bwd'][1]} vs "
                                        f"{t_db * 1e3:6.1f} us" if "bwd" in best else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="search the fused kernels' launch configs per M")
    ap.add_argument("--sweep-formats", action="store_true", help="search dequantize's and quantize's launch shapes")
    ap.add_argument("--sweep-m", type=int, nargs="*", default=[1, 16, 32, 64, 128, 256],
                    help="the rows --sweep tries with the tiled kernel (each M compiles and times tens of configs)")
    ap.add_argument("--sweep-gemv-m", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                    help="the rows --sweep tries with the GEMV")
    ap.add_argument("--parts", nargs="+", choices=["formats", "floor", "matmul", "int8"],
                    default=["formats", "floor", "matmul", "int8"],
                    help="which tables to measure (default: all)")
    args = ap.parse_args()
    import bitsandbytes as bnb

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bitsandbytes {bnb.__version__}")
    rows: list = []
    if args.sweep:
        sweep(rows, tuple(args.sweep_m), tuple(args.sweep_gemv_m))
    else:
        bw = copy_bandwidth()
        rows.append({"op": "copy", "gbs": bw})
        print(f"device copy: {bw:.0f} GB/s")
        if args.sweep_formats:
            sweep_formats(rows, bw)
        if "formats" in args.parts:
            bench_formats(rows, bw)
        if "floor" in args.parts:
            bench_floor(rows)
        if "matmul" in args.parts:
            bench_matmul(rows)
        if "int8" in args.parts:
            sys.path.insert(0, os.path.dirname(__file__))
            from bench_int8 import bench_int8

            bench_int8(rows)
    name = "bench_kernels_sweep.json" if args.sweep else "bench_kernels.json"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
