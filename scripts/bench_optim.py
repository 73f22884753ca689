"""One optimizer step over LoRA-shaped tensors: qtune AdamW8bit vs bitsandbytes AdamW8bit vs torch's
fused AdamW (fp32 states) vs torchao AdamW8bit, in one process on one GPU.

    python scripts/bench_optim.py [--tensors 800] [--iters 30]

Workload: `--tensors` tensors alternating 4096x64 and 64x4096 (800: 209.7M elements), random
gradients, fp32 then bf16 parameters. Times `step()` (host work included) with CUDA events,
median of `--iters` after warm-up; prints ms, ratios, state bytes per parameter and, for qtune,
the CUDA kernels launched per step. Byte floor of an 8-bit step: 16 B/elem (fp32 params) and
10 B/elem (bf16) at the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def make(n_tensors: int, dtype: torch.dtype):
    shapes = [(4096, 64) if i % 2 == 0 else (64, 4096) for i in range(n_tensors)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def time_step(opt, iters: int) -> float:
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        opt.step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                total += v.numel() * v.element_size()
    return total


def kernels_per_step(opt) -> tuple[int, float]:
    """(CUDA kernels launched by one step, their total GPU time in ms)."""
    from torch.profiler import ProfilerActivity, profile

    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def copy_bandwidth() -> float:
    x = torch.empty(2**30 // 4 * 2, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    b.synchronize()
    return 2 * x.numel() * 4 * 10 / (a.elapsed_time(b) / 1e3)


def competitors(sweep: bool):
    import qtune.optim
    from qtune.kernels import adam8bit

    default_launch, default_shared = dict(adam8bit.LAUNCH), adam8bit.LUT_SHARED

    def qtune_with(launch, shared, paged=False):
        def build(ps):  # every dtype's launch shape set to `launch` (None: the defaults)
            adam8bit.LAUNCH = {dt: launch or default_launch[dt] for dt in default_launch}
            adam8bit.LUT_SHARED = shared
            return qtune.optim.AdamW8bit(ps, lr=1e-4, paged=paged)
        return build

    shapes = [((nb, w, r), True) for nb, w, r in ((4, 4, 0), (4, 4, 80), (4, 4, 64), (4, 4, 56), (4, 4, 48),
                                                (8, 4, 0), (8, 4, 96), (8, 4, 80), (8, 4, 72), (8, 4, 64),
                                                (4, 2, 96), (4, 2, 80), (4, 2, 64), (16, 4, 96), (16, 4, 80))]
    for launch, shared in (shapes if sweep else []):
        yield (f"qtune nb={launch[0]} w={launch[1]} regs<={launch[2] or '-'} {'smem' if shared else 'L1'}",
               qtune_with(launch, shared))
    yield "qtune AdamW8bit", qtune_with(None, default_shared)
    yield "qtune AdamW8bit paged", qtune_with(None, default_shared, paged=True)  # states in host memory
    yield "torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
    try:
        import bitsandbytes as bnb

        yield "bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
        yield "bitsandbytes PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4)
    except ImportError as e:
        print(f"bitsandbytes not measured: {e}")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        yield "torchao AdamW8bit", lambda ps: AoAdamW8bit(ps, lr=1e-4)
    except Exception as e:  # noqa: BLE001 - any import failure means "not measured"
        print(f"torchao not measured: {type(e).__name__}: {e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=800)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="also time other launch shapes of qtune's kernel")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_optim.json"))
    a = ap.parse_args(argv)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        n = sum(p.numel() for p in make(a.tensors, dtype))
        floor = n * (16 if dtype == torch.float32 else 10) / bw * 1e3
        print(f"\n{a.tensors} tensors, {n / 1e6:.1f}M elements, {str(dtype)[6:]} params; 8-bit byte floor {floor:.2f} ms")
        base = {}
        for name, build in competitors(a.sweep):
            params = make(a.tensors, dtype)
            try:
                opt = build(params)
                ms = time_step(opt, a.iters)
            except Exception as e:  # noqa: BLE001
                print(f"  {name:24} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            r = {"name": name, "dtype": str(dtype)[6:], "ms": ms, "state_bytes_per_param": state_bytes(opt) / n}
            if name.startswith("qtune"):
                r["kernels_per_step"], r["kernel_ms"] = kernels_per_step(opt)
            base[name] = ms
            rows.append(r)
            del opt, params
            torch.cuda.empty_cache()
        q = base.get("qtune AdamW8bit")
        for r in rows:
            if r["dtype"] != str(dtype)[6:]:
                continue
            ratio = f"  qtune is {r['ms'] / q:.1f}x faster" if q and not r["name"].startswith("qtune") else ""
            extra = (f"  ({r['kernels_per_step']} kernel/step, {r['kernel_ms']:.2f} ms on the GPU)"
                     if "kernels_per_step" in r else "")
            print(f"  {r['name']:24} {r['ms']:8.2f} ms   {r['state_bytes_per_param']:.3f} B/param{ratio}{extra}")
    with open(a.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
