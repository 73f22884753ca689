"""Host time of one AdamW8bit step and a single kernel launch for Nsight Compute:
    ncu --section SpeedOfLight --section WarpStateStats -k regex:_adam_kernel --launch-skip 3 --launch-count 1 \\
        python3 scripts/profile_adam.py"""

import time

import torch

import qtune.optim

params = [torch.nn.Parameter(torch.randn((4096, 64) if i % 2 == 0 else (64, 4096), device="cuda")) for i in range(800)]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt = qtune.optim.AdamW8bit(params, lr=1e-4)
for _ in range(5):
    opt.step()
torch.cuda.synchronize()
t = []
for _ in range(20):
    torch.cuda.synchronize()
    a = time.perf_counter()
    opt.step()
    t.append(time.perf_counter() - a)
    torch.cuda.synchronize()
print(f"host time of step(): median {sorted(t)[10] * 1e3:.3f} ms")
