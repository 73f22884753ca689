"""Host time of one AdamW8bit step, split into its parts, and a single kernel launch for Nsight Compute:
    ncu --section SpeedOfLight --section WarpStateStats -k regex:_adam --launch-skip 3 --launch-count 1 \\
        python3 scripts/profile_adam.py [float32|bfloat16]

Prints the median host time of step() (fp32 and bf16 params, 800 LoRA-shaped tensors), of reading
the gradients' addresses, and of the kernel launch alone (Triton's launcher, GPU idle)."""

import operator
import sys
import time

import torch

import qtune.optim
from qtune.kernels import adam8bit as kernel
from qtune.optim.adamw8bit import _device_maps


def host_ms(fn, n: int = 40) -> float:
    t = []
    for _ in range(n):
        torch.cuda.synchronize()
        a = time.perf_counter()
        fn()
        t.append(time.perf_counter() - a)
    torch.cuda.synchronize()
    return sorted(t)[n // 2] * 1e3


for dtype in [getattr(torch, a) for a in sys.argv[1:]] or (torch.float32, torch.bfloat16):
    params = [torch.nn.Parameter(torch.randn((4096, 64) if i % 2 == 0 else (64, 4096), device="cuda", dtype=dtype))
              for i in range(800)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = qtune.optim.AdamW8bit(params, lr=1e-4)
    for _ in range(5):
        opt.step()
    b = opt._plans[0].buckets[0]
    maps = _device_maps(params[0].device)
    grad, ptr = operator.attrgetter("grad"), torch.Tensor.data_ptr

    def launch():
        kernel.adam_step(b.work, params[0], b.p_offs, b.g_offs, b.align, b.numels, b.elem_offs, b.block_offs,
                         (-1e-4, 1e-8), b.state1, b.state2, b.absmax1, b.absmax2, maps, beta1=0.9, beta2=0.999,
                         decay=1.0 - 1e-6, l2=0.0, launch=b.launch)

    grads = list(map(grad, params))
    addrs, index = list(map(ptr, grads)), list(range(len(params)))
    same = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    print(f"{str(dtype)[6:]} params, launch {b.launch}: host time of step() {host_ms(opt.step):.3f} ms; gradient "
          f"addresses {host_ms(lambda: list(map(ptr, map(grad, params)))):.3f} ms (the gradients alone "
          f"{host_ms(lambda: list(map(grad, params))):.3f}, compared {host_ms(lambda: list(map(ptr, grads)) == addrs):.3f}"
          f", checked in C++ {host_ms(lambda: same(list(map(grad, params)), addrs, index)) if same else float('nan'):.3f})"
          f"; kernel launch {host_ms(launch):.3f} ms")
