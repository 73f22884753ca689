"""Triton launches without Triton's per-call binding: the first launch of a specialization goes
through `kernel[grid](...)`, later ones straight to its compiled launcher with the tensors passed as
addresses. On the H100 hosts here that takes a launch from ~55 us to ~15 us of host time, which a
decode-size matmul, a quantize call or an optimizer step pays in full. On Triton 3.6 a later launch
also skips the launcher's Python wrapper (scratch allocation, tensor-descriptor encoding) and calls
its C function (`Launcher`): ~9 us -> ~4 us. Imports torch and triton only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton import knobs
from triton.runtime import driver

try:  # what Triton's binder specializes each argument on (dtype, 16-byte alignment, int range, == 1)
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
except ImportError:  # another Triton: every launch takes Triton's own path
    native_specialize_impl = None
try:  # the launcher's encoding of a tensor descriptor into its TMA map (Triton 3.6)
    from triton.backends.nvidia.driver import make_tensordesc_arg
except ImportError:
    make_tensordesc_arg = None
# The C launcher's arguments as Triton 3.6 lays them out (grid, stream, function, cooperative, PDL,
# two scratch buffers, metadata, launch metadata, two hooks, then the kernel's values in order).
C_LAUNCH = triton.__version__.startswith("3.6.") and make_tensordesc_arg is not None

# Launcher by (kernel, specialization, constexprs, options, device). None once a direct launch failed (a
# Triton whose launcher takes other arguments): Triton's own path from then on.
_COMPILED: dict[tuple, Launcher] | None = {}


class HostDesc(NamedTuple):
    """What the launcher reads of a host tensor descriptor to encode its TMA map: a tensor with its
    shape and strides in elements (TensorDescriptor without its checks, a few us of host time)."""

    base: torch.Tensor
    shape: list[int]
    strides: list[int]
    padding: str = "zero"


class Launcher:
    """A compiled specialization's launch. Where C_LAUNCH, Triton's C launcher is called directly
    (`c`, `head` its arguments before the kernel's), each tensor descriptor among the kernel's values
    encoded as Triton's Python wrapper would (`descs`: (index, metadata), last first; `metas` by index);
    else compiled.run (no descriptors known)."""

    def __init__(self, compiled, names: tuple[str, ...]):
        run = compiled.run
        self.compiled, self.names, self.c, self.descs, self.metas = compiled, names, None, (), {}
        self.head = (compiled.function, getattr(run, "launch_cooperative_grid", False),
                     getattr(run, "launch_pdl", False), None, None, compiled.packed_metadata, None, None, None)
        fn = getattr(run, "launch", None)
        if not C_LAUNCH or fn is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
            return
        code = getattr(fn, "__code__", None)
        if code is None:  # the C function itself: no tensor descriptors
            self.c = fn
            return
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
        if set(cells) == {"launcher", "tensordesc_indices", "tensordesc_meta"}:  # wrap_handle_tensordesc's
            metas = cells["tensordesc_meta"] or [None] * len(cells["tensordesc_indices"])
            self.descs = tuple(sorted(zip(sorted(cells["tensordesc_indices"]), metas), key=lambda t: -t[0]))
            self.c, self.metas = cells["launcher"], dict(self.descs)

    def values(self, args: tuple, consts: dict) -> list:
        """The kernel's values in order: `args` (tensors as addresses), then `consts` by name."""
        return [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args] + [consts[n] for n in self.names]

    def encode(self, desc, index: int) -> list:
        """The C launcher's values for a tensor descriptor (TensorDescriptor or HostDesc) at parameter
        `index`: its TMA map, shape and strides."""
        return make_tensordesc_arg(desc, self.metas[index])

    def __call__(self, grid: tuple[int, ...], stream: int, values: list) -> None:
        """Launch on `grid` (three ints) with the kernel's values in order (addresses for tensors,
        constexprs included)."""
        if self.c is None:
            c = self.compiled
            c.run(*grid, stream, c.function, c.packed_metadata, None, None, None, *values)
            return
        self.c(*grid, stream, *self.head, *self.flat(values))

    def flat(self, values: list) -> list:
        """`values` with each tensor descriptor replaced by what the C launcher takes for it."""
        for i, meta in self.descs:
            values[i:i + 1] = make_tensordesc_arg(values[i], meta)
        return values


class Plan(NamedTuple):
    """A launch replayed without Triton: its Launcher's C function, grid and values as a first launch
    gave them (tensor descriptors encoded), edited per call where addresses change."""

    launcher: Launcher
    grid: tuple[int, int, int]
    values: list

    @classmethod
    def of(cls, launcher: Launcher | None, grid: tuple[int, ...], args: tuple, consts: dict) -> Plan | None:
        """The plan of a launch that `launch` returned `launcher` for; None where it has no C launcher."""
        if launcher is None or launcher.c is None:
            return None
        return cls(launcher, _grid3(grid), launcher.flat(launcher.values(args, consts)))

    def __call__(self, stream: int, *edits: tuple[int, list]) -> None:
        """Launch on `stream` with values[start:start + len(new)] = new for each (start, new)."""
        values = self.values.copy()
        for start, new in edits:
            values[start:start + len(new)] = new
        self.launcher.c(*self.grid, stream, *self.launcher.head, *values)


PLAN_LIMIT = 4096  # plans a caller keeps (by weight and shape) before it clears them


def recall(plans: dict, key: tuple) -> Plan | None:
    """plans[key] if there is one and no launch hook is set (a hook needs Triton's own path)."""
    plan = plans.get(key)
    return None if plan is None or hooked() else plan


def remember(plans: dict, key: tuple, plan: Plan | None) -> None:
    """plans[key] = plan where there is one, the dict cleared when it holds PLAN_LIMIT."""
    if plan is not None:
        if len(plans) >= PLAN_LIMIT:
            plans.clear()
        plans[key] = plan


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (*grid, *(1,) * (3 - len(grid)))


def stream(device_index: int) -> int:
    """The current CUDA stream of that device, as launchers take it."""
    return driver.active.get_current_stream(device_index)


def hooked() -> bool:
    """Whether a launch hook is set (a profiler): launches then take Triton's own path, which calls it."""
    hook = knobs.runtime.launch_enter_hook  # a chain of hooks (Triton 3.4+) or None
    return bool(getattr(hook, "calls", hook))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids: triton.cdiv costs ~2 us per call outside a kernel."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2 without its ~2 us."""
    return 1 << (n - 1).bit_length()


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int = 4, num_stages: int = 3, maxnreg: int | None = None,
           enable_fp_fusion: bool = True, launch_pdl: bool = False, key: tuple | None = None,
           **consts) -> Launcher | None:
    """kernel[grid](*args, **consts, **options) for the options named. `args` are the kernel's
    leading parameters in order, `consts` all the rest by name. `key`: what the caller knows to
    decide Triton's specialization of `args` (else it is computed, ~0.2 us per argument). The
    interpreter, a launch hook and the first launch of a key take Triton's own path. Returns the
    specialization's Launcher where later launches take it."""
    global _COMPILED
    cuda = isinstance(args[0], torch.Tensor) and args[0].is_cuda
    options = (num_warps, num_stages, maxnreg, enable_fp_fusion, launch_pdl)
    if _COMPILED is not None and cuda and native_specialize_impl is not None and not hooked():
        device = driver.active.get_current_device()
        if key is None:
            key = tuple([native_specialize_impl(CUDABackend, a, False, True, True) for a in args])
        full = (id(kernel), key, tuple(consts.values()), options, device)
        hit = _COMPILED.get(full)
        if hit is not None:
            try:
                hit(_grid3(grid), stream(device), hit.values(args, consts))
                return hit
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
        _COMPILED[full] = Launcher(compiled, names)
        return _COMPILED[full]
    return None
