"""What is alive on the GPU at a training run's peak: the real loop on a real config, with the CUDA
caching allocator's history recorded from the start (loading included).

    python scripts/memory_peak.py recipe=llama13b_t4 model.name=/path train.max_steps=2

Takes qtune.train's overrides (as scripts/profile_train.py). Replays the allocator's trace, finds
the moment the allocated bytes peak, and prints the live bytes there grouped by the innermost
qtune / transformers / peft source line that allocated them, plus the allocation that made the
peak. Compare the peak with the run's own `gpu_mem_gib` (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_train import compose  # noqa: E402

OURS = ("/qtune/", "/kernels/", "/transformers/", "/peft/", "/torch/utils/checkpoint", "/torch/autograd/")


def where(frames: list[dict]) -> str:
    """The innermost frame in qtune, transformers or peft (else the innermost one), as file:line fn."""
    for f in frames:
        if any(k in f["filename"] for k in OURS):
            return f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"
    return f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def _replay(trace: list[dict]):
    """(allocated bytes, the live allocations by address) after each event of an allocator trace."""
    live, total = {}, 0
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        yield total, live


def main() -> None:
    from omegaconf import OmegaConf

    from qtune import loop

    cfg = compose(sys.argv[1:])
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    optimizer_steps = []
    update = loop.apply_update

    def marked_update(*args, **kw):  # count optimizer steps in the trace
        optimizer_steps.append(len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]))
        return update(*args, **kw)

    loop.apply_update = marked_update
    from qtune import microstep

    calls, phases = microstep.MicroSteps.__call__, []

    def traced_call(self, batch):  # the peak so far after each micro-step, and whether it was eager
        torch.cuda.reset_peak_memory_stats()
        before = self.graph
        out = calls(self, batch)
        torch.cuda.synchronize()
        phases.append(("eager" if self.graph is None else "replay" if before is not None else "capture + replay",
                       torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30))
        return out

    microstep.MicroSteps.__call__ = traced_call
    loop.train(cfg, OmegaConf.to_container(cfg, resolve=True))
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    for i, (kind, now, top) in enumerate(phases):
        print(f"micro-step {i + 1} ({kind}): peak within it {top:.3f} GiB, allocated after it {now:.3f} GiB")
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, peak_at = max((total, i) for i, (total, _) in enumerate(_replay(trace)))
    peak_live = list(_replay(trace[:peak_at + 1]))[-1][1] if peak_at >= 0 else {}
    steps_before = sum(1 for s in optimizer_steps if s <= peak_at)
    print(f"\ntrace: {len(trace)} events; peak {peak / 2**30:.3f} GiB at event {peak_at} (after {steps_before} "
          f"optimizer steps)")
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for e in peak_live.values():
        g = groups[where(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    print("live at the peak, by allocating line (GiB, allocations):")
    for k, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {size / 2**30:7.3f}  {n:6d}  {k}")
    e = trace[peak_at]
    print(f"the peak's allocation: {e['size'] / 2**20:.1f} MiB from")
    for f in e.get("frames", [])[:25]:
        print(f"    {f['filename']}:{f['line']} {f['name']}")


if __name__ == "__main__":
    main()
