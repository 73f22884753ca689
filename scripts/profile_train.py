"""Where `python -m qtune.train` spends a step: the real loop on a real config, timed and profiled.

    python scripts/profile_train.py recipe=llama2_7b model.name=/path train.max_steps=12 [--skip 5 --active 3]

Takes the same overrides as qtune.train (output goes to a temp dir unless train.output_dir is set).
Every step ends with a device sync here (the loop syncs once per step anyway, reading the loss), so
the step times are wall times per step; steps --skip.. are profiled with torch.profiler (`--active`
of them) and the script prints: median step time, GPU busy time per step, the top GPU kernels and
CPU ops, and the host time between steps not covered by GPU work. Writes profile_train.json to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize

    from qtune import train as cli
    from qtune.config import register

    cli._resolvers()
    register()
    if not any(o.startswith("train.output_dir=") for o in overrides):
        overrides = [*overrides, f"train.output_dir={tempfile.mkdtemp(prefix='qtune-profile-')}"]
    with initialize(version_base=None):
        return hydra_compose("qtune_train", overrides=overrides)


CLASSES = (("attention", ("fmha", "flash", "attention")), ("matmul", ("gemm", "cutlass", "xmma", "sm90_", "cublas", "gemv")),
           ("4-bit dequantize", ("_dequant",)), ("4-bit fused matmul", ("_fwd_kernel", "_gemv_kernel", "_bwd_kernel")),
           ("8-bit adam", ("_adam",)), ("dropout", ("_dropout",)), ("rmsnorm", ("_rmsnorm",)),
           ("loss", ("cross_entropy", "softmax", "nll")),
           ("reduction", ("reduce",)), ("copy/cast", ("copy", "cat", "direct_copy")),
           ("elementwise", ("elementwise", "vectorized", "unrolled")))


def kernel_class(name: str) -> str:
    """A coarse class of a CUDA kernel from its name, for the per-class summary."""
    low = name.lower()
    return next((c for c, keys in CLASSES if any(k in low for k in keys)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", type=int, default=5, help="steps before profiling (compilation, warm-up)")
    ap.add_argument("--active", type=int, default=3, help="steps profiled")
    a, overrides = ap.parse_known_args()
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile, schedule

    from qtune import loop

    cfg = compose(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(wait=0, warmup=a.skip - 1, active=a.active, repeat=1))
    stamps: list[float] = []
    update = loop.apply_update

    def timed_update(*args, **kw):  # the end of a step: sync, stamp, advance the profiler
        out = update(*args, **kw)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        prof.step()
        return out

    loop.apply_update = timed_update
    prof.start()
    t0 = time.perf_counter()
    loop.train(cfg, resolved)
    prof.stop()
    steps = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    steady = steps[1:] or steps  # the first is compilation and capture
    med = statistics.median(steady) * 1e3
    print(f"\n{len(stamps)} steps in {time.perf_counter() - t0:.1f} s; step times (ms): "
          + " ".join(f"{s * 1e3:.0f}" for s in steps))
    print(f"median step from step 2: {med:.1f} ms (profiled steps run slower)")
    ev = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]  # a span, not a kernel
    gpu = sum(e.self_device_time_total for e in ev) / a.active / 1e3
    print(f"profiled {a.active} steps: GPU busy {gpu:.1f} ms/step ({gpu / med:.0%} of the median step)")
    classes: dict[str, float] = {}
    for e in ev:
        if e.self_device_time_total > 0:
            c = kernel_class(e.key)
            classes[c] = classes.get(c, 0.0) + e.self_device_time_total / a.active / 1e3
    print("GPU time by kernel class (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                            sorted(classes.items(), key=lambda kv: -kv[1])))
    print("top GPU kernels (ms/step, calls/step):")
    for e in sorted(ev, key=lambda e: e.self_device_time_total, reverse=True)[:30]:
        print(f"  {e.self_device_time_total / a.active / 1e3:8.2f}  {e.count // a.active:5d}x  {e.key[:100]}")
    print("top CPU ops by self time (ms/step, calls/step):")
    for e in sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]:
        print(f"  {e.self_cpu_time_total / a.active / 1e3:8.2f}  {e.count // a.active:5d}x  {e.key[:100]}")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "profile_train.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "step_ms": [s * 1e3 for s in steps], "median_ms": med, "gpu_busy_ms": gpu,
                   "top_gpu": [(e.key, e.count // a.active, e.self_device_time_total / a.active / 1e3) for e in
                               sorted(ev, key=lambda e: e.self_device_time_total, reverse=True)[:30]]}, f, indent=1)
    if cuda and os.environ.get("QTUNE_PROFILE_TRACE"):
        prof.export_chrome_trace(os.path.join(out, "profile_train_trace.json"))


if __name__ == "__main__":
    main()
