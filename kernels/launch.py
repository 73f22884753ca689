"""Triton launches without Triton's per-call binding: the first launch of a specialization goes
through `kernel[grid](...)`, later ones straight to its compiled launcher with the tensors passed as
addresses. On the H100 hosts here that takes a launch from ~55 us to ~15 us of host time, which a
decode-size matmul, a quantize call or an optimizer step pays in full. Imports torch and triton only.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver

try:  # what Triton's binder specializes each argument on (dtype, 16-byte alignment, int range, == 1)
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
except ImportError:  # another Triton: every launch takes Triton's own path
    native_specialize_impl = None

# (compiled kernel, names of the parameters after the positional ones) by (kernel, specialization,
# constexprs, options, device). None once a direct launch failed (a Triton whose launcher takes other
# arguments): Triton's own path from then on.
_COMPILED: dict[tuple, tuple] | None = {}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids: triton.cdiv costs ~2 us per call outside a kernel."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2 without its ~2 us."""
    return 1 << (n - 1).bit_length()


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int = 4, num_stages: int = 3, maxnreg: int | None = None,
           enable_fp_fusion: bool = True, launch_pdl: bool = False, key: tuple | None = None, **consts) -> None:
    """kernel[grid](*args, **consts, **options) for the options named. `args` are the kernel's
    leading parameters in order, `consts` all the rest by name. `key`: what the caller knows to
    decide Triton's specialization of `args` (else it is computed, ~0.2 us per argument). The
    interpreter, a launch hook and the first launch of a key take Triton's own path."""
    global _COMPILED
    cuda = isinstance(args[0], torch.Tensor) and args[0].is_cuda
    options = (num_warps, num_stages, maxnreg, enable_fp_fusion, launch_pdl)
    hook = knobs.runtime.launch_enter_hook  # a chain of hooks (Triton 3.4+) or None
    if _COMPILED is not None and cuda and native_specialize_impl is not None and not getattr(hook, "calls", hook):
        device = driver.active.get_current_device()
        if key is None:
            key = tuple([native_specialize_impl(CUDABackend, a, False, True, True) for a in args])
        full = (id(kernel), key, tuple(consts.values()), options, device)
        hit = _COMPILED.get(full)
        if hit is not None:
            compiled, names = hit
            try:
                values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
                compiled.run(*grid, *(1,) * (3 - len(grid)), driver.active.get_current_stream(device),
                             compiled.function, compiled.packed_metadata, None, None, None, *values,
                             *[consts[n] for n in names])
                return
            except TypeError:  # not launched: this Triton's launcher wants other arguments
                _COMPILED = None
    else:
        full = None
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    if launch_pdl:  # programmatic dependent launch (sm_90+): may start before the previous kernel ends
        extra["launch_pdl"] = True
    compiled = kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages,
                            enable_fp_fusion=enable_fp_fusion, **extra)
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    names = tuple(kernel.arg_names[len(args):])
    cacheable = full is not None and _COMPILED is not None and hasattr(compiled, "run")
    if cacheable and set(names) == set(consts):  # every parameter after `args` given by name
        _COMPILED[full] = (compiled, names)
