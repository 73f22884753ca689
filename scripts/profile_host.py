"""Host time of the 4-bit layer's forward and of quantize_4bit on a GPU machine: where a small
product or a quantize call spends its microseconds before and around its kernels.

    python scripts/profile_host.py

For Linear4bit (13824x5120, NF4 + double quant, bf16) at M = 1, 16, 64, its forward + input
gradient at M = 1 and 4096 against bf16 nn.Linear's, and quantize_4bit at 4096x4096 and 13824x5120: the
host time per call (calls issued back to back, then one sync), do_bench's time, the kernels' GPU
time per kernel (torch.profiler), and the top host-side ops by self time.
"""

from __future__ import annotations

import time

import torch
from triton.testing import do_bench

from qtune.kernels import matmul4bit as mm
from qtune.nn import Linear4bit
from qtune.quant import quantize_4bit

N, K = 13824, 5120


def host_us(fn, n: int = 200) -> float:
    """Median over 5 rounds of the host time per call of n back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        a = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - a) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


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


if __name__ == "__main__":
    main()
