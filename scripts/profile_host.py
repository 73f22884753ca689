"""Host time of the 4-bit layer's forward and of quantize_4bit on a GPU machine: where a small
product or a quantize call spends its microseconds before and around its kernels.

    python scripts/profile_host.py            # the breakdown below
    python scripts/profile_host.py --eager    # eager forward + dX against bitsandbytes and bf16

--eager: Linear4bit (NF4 + double quant, bf16), bitsandbytes' Linear4bit and bf16 nn.Linear, forward +
input gradient called eagerly (autograd's backward in its device thread, as a transformers Trainer
runs it) at mid-size and small M: host time per call in 15 alternating rounds of 100 calls (median,
min) and `do_bench` (median of 3 alternating rounds), with ratios.

For Linear4bit (13824x5120, NF4 + double quant, bf16) at M = 1, 16, 64, its forward + input
gradient at M = 1 and 4096 against bf16 nn.Linear's, and quantize_4bit at 4096x4096 and 13824x5120: the
host time per call (calls issued back to back, then one sync), do_bench's time, the kernels' GPU
time per kernel (torch.profiler), and the top host-side ops by self time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from triton.testing import do_bench

from qtune.kernels import matmul4bit as mm
from qtune.nn import Linear4bit
from qtune.quant import quantize_4bit

N, K = 13824, 5120


def round_us(fn, n: int) -> float:
    """Host time per call of n back-to-back calls, then a sync (not counted)."""
    a = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - a) / n * 1e6
    torch.cuda.synchronize()
    return t


def host_us(fn, n: int = 200) -> float:
    """Median over 5 rounds of the host time per call of n back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    return sorted(round_us(fn, n) for _ in range(5))[2]


def gpu_us(fn) -> tuple[float, list[tuple[str, float]]]:
    """Kernel time per call on the GPU, and the top host ops by self CPU time per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gpu = sum(e.device_time for e in kernels if "Memcpy" not in e.name) / 20
    per_kernel: dict[str, float] = {}
    for e in kernels:
        per_kernel[e.name[:30]] = per_kernel.get(e.name[:30], 0.0) + e.device_time / 20
    top = sorted(((e.key, e.self_cpu_time_total / 20) for e in events), key=lambda t: -t[1])[:6]
    print("    kernels (us per call): " + ", ".join(f"{k} {v:.1f}" for k, v in per_kernel.items()))
    return gpu, top


def report(name: str, fn) -> None:
    gpu, top = gpu_us(fn)
    print(f"{name}: host {host_us(fn):7.1f} us/call, do_bench {do_bench(fn, warmup=25, rep=100) * 1e3:7.1f} us, "
          f"kernels {gpu:6.1f} us on the GPU; top host ops: "
          + ", ".join(f"{k[:40]} {v:.1f}" for k, v in top), flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin, double_quant=True)
    s = q.quant_state
    with torch.no_grad():
        for m in (1, 16, 64):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            report(f"Linear4bit M={m:3}", lambda: q(x))
            report(f"launcher   M={m:3}", lambda: mm.forward(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors))
    lin.weight.requires_grad_(False)
    for m in (1, 4096):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, N, device="cuda", dtype=torch.bfloat16)
        report(f"forward + dX M={m}, Linear4bit", lambda: torch.autograd.grad(q(x), x, dy))
        report(f"forward + dX M={m}, bf16 Linear", lambda: torch.autograd.grad(lin(x), x, dy))
    for shape in ((4096, 4096), (N, K)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        report(f"quantize {shape}", lambda: quantize_4bit(w, 64, "nf4", True))
        report(f"quantize {shape} without double quant", lambda: quantize_4bit(w, 64, "nf4", False))
    from qtune.kernels import launch

    counts: dict[str, int] = {}
    for k in launch._COMPILED or {}:
        counts[str(k[0])] = counts.get(str(k[0]), 0) + 1
    print(f"cached launches: {len(launch._COMPILED or {})} specializations over {len(counts)} kernels")


def eager() -> None:
    import bitsandbytes as bnb

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_kernels import layers

    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    for n, k, m in ((4096, 4096, 512), (N, K, 512), (N, K, 1024), (K, N, 1024), (N, K, 2048), (4096, 4096, 64),
                    (4096, 4096, 1)):
        lin, q, b = layers(n, k)
        lin.requires_grad_(False)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        fns = {name: (lambda layer=layer: torch.autograd.grad(layer(x), x, dy))
               for name, layer in (("qtune", q), ("bnb", b), ("bf16", lin))}
        host: dict[str, list[float]] = {name: [] for name in fns}
        bench: dict[str, list[float]] = {name: [] for name in fns}
        for f in fns.values():
            f()
        torch.cuda.synchronize()
        for _ in range(15):
            for name, f in fns.items():
                host[name].append(round_us(f, 100))
        for _ in range(3):
            for name, f in fns.items():
                bench[name].append(do_bench(f, warmup=10, rep=50) * 1e3)
        h = {name: statistics.median(v) for name, v in host.items()}
        d = {name: statistics.median(v) for name, v in bench.items()}
        print(f"{n}x{k} M={m}: host us/call (min) " + ", ".join(f"{name} {h[name]:.1f} ({min(host[name]):.1f})"
                                                          for name in fns)
              + "; do_bench " + ", ".join(f"{name} {d[name]:.1f}" for name in fns)
              + f"; qtune/bnb host {h['qtune'] / h['bnb']:.2f}, do_bench {d['qtune'] / d['bnb']:.2f}; "
              f"qtune/bf16 host {h['qtune'] / h['bf16']:.2f}, do_bench {d['qtune'] / d['bf16']:.2f}", flush=True)


if __name__ == "__main__":
    eager() if sys.argv[1:] == ["--eager"] else main()
