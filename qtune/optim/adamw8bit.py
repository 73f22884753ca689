"""Adam8bit / AdamW8bit: torch.optim.Optimizer subclasses with blockwise 8-bit moments.

On CUDA each step is one fused Triton launch per (param dtype, state kind) of a param group,
over flat state buffers and a cached work list; elsewhere (or with QTUNE_BACKEND=torch) the torch
reference runs tensor by tensor. Per-parameter state entries (`step`, `state1`, `state2`,
`absmax1`, `absmax2`) are views into the flat buffers, so state_dict()/load_state_dict() work as
for any optimizer and keep the 8-bit codes exactly.

With `paged=True` the fused path keeps its flat state buffers in pinned host memory, which the
kernel reads and writes over the bus (a 13B model's r=64 adapters: 0.47 GiB off the GPU, read and
written once per step), the way bitsandbytes' paged optimizers move their states out of the GPU's way.

DTensor parameters (FSDP2's shards) are stepped on their local shards: each rank's states cover
its own shard only, and its state_dict() holds just those.
"""

from __future__ import annotations

import functools
import operator
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ..quant.codes import FLOAT_DTYPES
from . import reference
from .reference import BLOCK, state_maps

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = ()

PARAM_DTYPES = FLOAT_DTYPES
_GRAD, _DATA_PTR = operator.attrgetter("grad"), torch.Tensor.data_ptr


def _local(t):
    """The local shard of a DTensor (FSDP2 parameters and their gradients); any other tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


_POINTERS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)  # CUDA builds of torch
_RANGES: dict[int, list[int]] = {}


def _same_addresses(grads: list, addrs: list[int] | None, n: int) -> bool:
    """Whether the gradients `grads` still sit at `addrs`, checked in one C++ call where torch has
    it (its CUDA graph trees check their static inputs with it); False when unknown."""
    if addrs is None or _POINTERS_EQUAL is None:
        return False
    index = _RANGES.get(n) or _RANGES.setdefault(n, list(range(n)))
    try:
        return _POINTERS_EQUAL(grads, addrs, index)
    except (TypeError, RuntimeError):  # a gradient is None
        return False


def _kernel_filter():
    """Which tensors the fused Triton kernel takes: CUDA ones; QTUNE_BACKEND=torch forces the
    reference, QTUNE_BACKEND=triton the kernel (on the CPU under TRITON_INTERPRET=1, for tests)."""
    backend = os.environ.get("QTUNE_BACKEND", "").lower()
    if backend == "torch":
        return lambda p: False
    if backend == "triton":
        return lambda p: p.is_contiguous()
    return lambda p: p.is_cuda and p.is_contiguous()


@dataclass
class _Bucket:
    """Tensors of one group sharing a param dtype and a state kind, updated by one launch."""

    params: list[torch.Tensor]
    index: list[int]  # positions of `params` in the group's parameter list
    whole: bool  # index is 0..n-1: the bucket is the whole group, in order
    dtype: torch.dtype
    state1: torch.Tensor  # flat
    state2: torch.Tensor
    absmax1: torch.Tensor | None
    absmax2: torch.Tensor | None
    work: torch.Tensor  # (programs, 2) int32
    launch: tuple[int, int]  # (blocks per program, warps): the work list's and the kernel's
    numels: torch.Tensor
    elem_offs: torch.Tensor
    block_offs: torch.Tensor
    p_addrs: list[int]
    steps: np.ndarray  # int64; each parameter's state["step"] is a CPU tensor viewing one entry
    uniform: bool  # all tensors at the same step
    device: torch.device
    p_offs: torch.Tensor | None = None  # element offsets from params[0], uploaded with the gradients'
    g_offs: torch.Tensor | None = None
    align: int = 1  # elements every offset is a multiple of
    g_addrs: list[int] = field(default_factory=list)


@dataclass
class _Plan:
    """How a param group steps, decided once per layout (which parameters have gradients)."""

    key: tuple
    backend: str
    n: int  # parameters in the group
    fast: bool  # every parameter has a gradient and all go to the kernel
    sharded: bool  # some parameters are DTensors (stepped on their local shards)
    rest: list[torch.Tensor]  # stepped by the reference
    buckets: list[_Bucket]
    g_addrs: list[int] | None = None  # the gradients' addresses at the last step


def _hooks_when_needed(step):
    """`step` behind torch's wrapper (profiler range, step hooks) only while a profiler or a step
    hook is on. torch.optim.Optimizer wraps every subclass's step in it unless `step.hooked`; it
    costs ~35 us per call, a fifth of the fused step's host time."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, closure=None):
        if (_global_optimizer_pre_hooks or _global_optimizer_post_hooks or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or torch._C._autograd._profiler_enabled()):
            return hooked(self, closure)
        return step(self, closure)

    wrapper.hooked = True
    return wrapper


class Adam8bit(torch.optim.Optimizer):
    """Adam with blockwise 8-bit moments (256 values per float32 absmax; first moment on the
    signed dynamic map, second on the unsigned one). Tensors under `min_8bit_size` elements keep
    float32 moments. `weight_decay` is L2 (added to the gradient), as in torch.optim.Adam.
    `paged`: CUDA parameters' states live in pinned host memory, not on the GPU."""

    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, min_8bit_size: int = 4096, paged: bool = False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be > 0)")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r} (a positive int)")
        if not isinstance(paged, bool):
            raise ValueError(f"Invalid paged: {paged!r} (True or False)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size, self.paged = min_8bit_size, paged
        self._plans: dict[int, _Plan] = {}

    # ----- state -------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            eight_bit = p.numel() >= self.min_8bit_size  # the whole tensor decides, also for a DTensor's shard
            p = _local(p)
            state["step"] = 0
            if eight_bit:
                blocks = -(-p.numel() // BLOCK)
                state["state1"] = torch.full_like(p, 127, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state["state2"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            else:
                state["state1"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["state2"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # Keep the dtype of every state tensor (uint8 codes, float32 absmax and moments); only move.
        # The step stays on the CPU: it only feeds host-side bias corrections.
        if key == "step" or not isinstance(value, torch.Tensor):
            return value
        return value.to(device=param.device)

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                       for k, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict of an optimizer over the same parameter layout (one-line ValueError
        naming the first parameter whose saved state does not fit)."""
        groups, saved_groups = self.param_groups, state_dict.get("param_groups", [])
        if len(groups) != len(saved_groups):
            raise ValueError(f"optimizer state dict has {len(saved_groups)} param groups; this optimizer has {len(groups)}")
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"param group {gi} of the state dict has {len(sg['params'])} parameters; "
                                 f"this optimizer's has {len(g['params'])}")
            for p, pid in zip(g["params"], sg["params"]):
                s = state_dict["state"].get(pid)
                if s is not None:
                    self._check_saved_state(p, s, f"param group {gi}, parameter {pid}")
        self._plans.clear()  # flat buffers are rebuilt from the loaded per-parameter states
        super().load_state_dict(state_dict)

    @staticmethod
    def _check_saved_state(p: torch.Tensor, s: dict, where: str) -> None:
        p = _local(p)
        n = p.numel()
        s1 = s.get("state1")
        if s1 is None or "state2" not in s or "step" not in s:
            raise ValueError(f"{where}: saved state lacks state1/state2/step; keys {sorted(s)}")
        if s1.numel() != n or s["state2"].numel() != n:
            raise ValueError(f"{where}: saved state holds {s1.numel()} values; the parameter has shape "
                             f"{tuple(p.shape)} ({n} values)")
        if "absmax1" in s:
            blocks = -(-n // BLOCK)
            if s1.dtype != torch.uint8 or s["absmax1"].numel() != blocks or s["absmax2"].numel() != blocks:
                raise ValueError(f"{where}: saved 8-bit state does not fit a parameter of {n} values "
                                 f"({blocks} blocks of {BLOCK})")
        elif s1.dtype != torch.float32:
            raise ValueError(f"{where}: saved state1 has dtype {s1.dtype}; expected uint8 with absmax, or float32")

    # ----- step ----------------------------------------------------------------------------------
    @_hooks_when_needed
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        backend = os.environ.get("QTUNE_BACKEND", "")
        for gi, group in enumerate(self.param_groups):
            plan = self._plans.get(gi)
            if plan is not None and plan.fast and plan.backend == backend and plan.n == len(group["params"]):
                try:  # the common case: every parameter has a gradient and goes to the kernel
                    ps = group["params"]
                    if plan.sharded:
                        g_addrs = [_local(p.grad).data_ptr() for p in ps]
                    else:  # no per-tensor check on the hot path
                        grads = list(map(_GRAD, ps))
                        g_addrs = (plan.g_addrs if _same_addresses(grads, plan.g_addrs, plan.n)
                                   else list(map(_DATA_PTR, grads)))
                except (AttributeError, TypeError):  # a gradient is None: work out the layout again
                    pass
                else:
                    plan.g_addrs = g_addrs
                    self._fused_step(group, plan.buckets, g_addrs)
                    continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            key = tuple(map(id, params))
            if plan is None or plan.key != key or plan.backend != backend:  # decided once per layout
                use_kernel = _kernel_filter()
                for p in params:
                    self._check_param(p)
                fused = [p for p in params if use_kernel(_local(p))]
                fused_ids = set(map(id, fused))
                plan = _Plan(key=key, backend=backend, n=len(group["params"]),
                             fast=len(fused) == len(params) == len(group["params"]),
                             sharded=any(isinstance(p, DTensor) for p in params),
                             rest=[p for p in params if id(p) not in fused_ids],
                             buckets=self._build_buckets(fused) if fused else [])
                self._plans[gi] = plan
            for p in plan.rest:
                self._reference_step(p, group)
            if plan.buckets:
                self._fused_step(group, plan.buckets, None)
        return loss

    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        p, grad = _local(p), _local(p.grad)
        if grad.is_sparse:
            raise RuntimeError("Adam8bit does not support sparse gradients")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"parameter dtype {p.dtype} is not supported; allowed: float32, float16, bfloat16")
        if grad.dtype != p.dtype or grad.device != p.device or grad.shape != p.shape:
            raise TypeError(f"gradient ({grad.dtype}, {grad.device}, {tuple(grad.shape)}) does not match its "
                            f"parameter ({p.dtype}, {p.device}, {tuple(p.shape)})")

    def _reference_step(self, p: torch.Tensor, group: dict) -> None:
        state = self._init_state(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        reference.adam_step(_local(p), _local(p.grad), state, lr=group["lr"], beta1=beta1, beta2=beta2,
                            eps=group["eps"], weight_decay=group["weight_decay"], decoupled=self._decoupled,
                            step=int(state["step"]))

    def _fused_step(self, group: dict, buckets: list[_Bucket], g_addrs_all: list[int] | None) -> None:
        """One launch per bucket. `g_addrs_all`: gradient addresses of all the group's parameters
        in order, when the caller has them (else they are read from the bucket's parameters)."""
        kernel = _kernel_module()
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for b in buckets:
            first, last = _local(b.params[0]), _local(b.params[-1])
            if first.data_ptr() != b.p_addrs[0] or last.data_ptr() != b.p_addrs[-1]:
                b.p_addrs = [_local(p).data_ptr() for p in b.params]  # parameters were moved (model.to(...))
                b.g_addrs, b.device = [], first.device
            device = b.device
            if g_addrs_all is not None:
                g_addrs = g_addrs_all if b.whole else [g_addrs_all[i] for i in b.index]
            else:
                g_addrs = [_local(p.grad).data_ptr() for p in b.params]
            grads = None
            if g_addrs is not b.g_addrs and g_addrs != b.g_addrs:  # new gradients: check them, upload offsets
                grads = [_local(p.grad) for p in b.params]
                for p in b.params:
                    self._check_param(p)
                if not all(map(torch.Tensor.is_contiguous, grads)):
                    grads = [g.contiguous() for g in grads]  # temporaries: their addresses are not kept
                    g_addrs = [g.data_ptr() for g in grads]
                self._upload_offsets(b, g_addrs, device)
                b.g_addrs = g_addrs if grads[0] is _local(b.params[0].grad) else []
            b.steps += 1  # numpy: a tenth of a torch op's host time; the state["step"] views follow
            if b.uniform:
                scalars = reference.step_scalars(lr, beta1, beta2, group["eps"], int(b.steps[0]))
            else:
                table = [reference.step_scalars(lr, beta1, beta2, group["eps"], n) for n in b.steps.tolist()]
                scalars = torch.tensor(table, dtype=torch.float32).to(device)
            kernel.adam_step(b.work, _local(b.params[0]), b.p_offs, b.g_offs, b.align, b.numels, b.elem_offs,
                             b.block_offs, scalars, b.state1, b.state2, b.absmax1, b.absmax2, _device_maps(device),
                             beta1=beta1, beta2=beta2, decay=1.0 - lr * wd if self._decoupled else 1.0,
                             l2=0.0 if self._decoupled else wd, launch=b.launch)
            del grads  # any contiguous copies live until after the launch (stream-ordered frees are safe)

    @staticmethod
    def _upload_offsets(b: _Bucket, g_addrs: list[int], device: torch.device) -> None:
        """Element offsets of the bucket's parameters and gradients from its first parameter."""
        from ..kernels.adam8bit import element_offsets

        base, size = b.p_addrs[0], _local(b.params[0]).element_size()
        p_offs, p_align = element_offsets(b.p_addrs, base, size)
        g_offs, g_align = element_offsets(g_addrs, base, size)
        b.p_offs, b.g_offs = _to_device(p_offs, device), _to_device(g_offs, device)
        b.align = min(p_align, g_align)

    def _build_buckets(self, params: list[torch.Tensor]) -> list[_Bucket]:
        """Flat state buffers per (dtype, state kind), filled from the per-parameter states, which
        then become views into them; plus the kernel's tables."""
        from ..kernels.adam8bit import LAUNCH, work_list

        device = _local(params[0]).device
        paged = self.paged and device.type == "cuda"  # states in pinned host memory, read by the kernel
        state_device = torch.device("cpu") if paged else device
        position = {id(p): i for i, p in enumerate(params)}
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            st = self.state[p]
            eight_bit = "absmax1" in st if st else p.numel() >= self.min_8bit_size  # as _init_state decides
            groups.setdefault((p.dtype, eight_bit), []).append(p)
        buckets = []
        for (dtype, eight_bit), ps in groups.items():
            numels = [_local(p).numel() for p in ps]
            elem_offs = np.cumsum([0] + [-(-n // 16) * 16 for n in numels[:-1]]).tolist()  # 16-aligned segments
            blocks = [-(-n // BLOCK) for n in numels]
            block_offs = np.cumsum([0] + blocks[:-1]).tolist()
            fresh = [not self.state[p] for p in ps]  # new states are made in place in the flat buffers
            flat = {}
            names = ("state1", "state2", "absmax1", "absmax2") if eight_bit else ("state1", "state2")
            for name in names:
                absmax = name.startswith("absmax")
                offs, sizes = (block_offs, blocks) if absmax else (elem_offs, numels)
                fill = 127 if eight_bit and name == "state1" else 0  # the signed map's zero code
                kind = torch.uint8 if eight_bit and not absmax else torch.float32
                flat[name] = torch.full((offs[-1] + sizes[-1],), fill, dtype=kind, device=state_device,
                                        pin_memory=paged)
                for p, off, n, new in zip(ps, offs, sizes, fresh):
                    view = flat[name][off: off + n]
                    if not new:
                        view.copy_(self.state[p][name].reshape(-1))
                    self.state[p][name] = view if absmax else view.view(_local(p).shape)
            for p, new in zip(ps, fresh):
                if new:
                    self.state[p]["step"] = 0
            as_dev = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
            steps = np.array([int(self.state[p]["step"]) for p in ps], dtype=np.int64)
            views = torch.from_numpy(steps)
            for i, p in enumerate(ps):
                self.state[p]["step"] = views[i]  # a view: `steps += 1` advances every parameter's step
            index = [position[id(p)] for p in ps]
            buckets.append(_Bucket(params=ps, index=index, whole=index == list(range(len(params))), dtype=dtype,
                                   state1=flat["state1"], state2=flat["state2"], steps=steps,
                                   uniform=bool((steps == steps[0]).all()), device=device,
                                   absmax1=flat.get("absmax1"), absmax2=flat.get("absmax2"),
                                   work=work_list(numels, device, LAUNCH[dtype][0]), launch=LAUNCH[dtype],
                                   numels=as_dev(numels),
                                   elem_offs=as_dev(elem_offs), block_offs=as_dev(block_offs),
                                   p_addrs=[_local(p).data_ptr() for p in ps]))
        return buckets


class AdamW8bit(Adam8bit):
    """AdamW with blockwise 8-bit moments: decoupled weight decay, applied after the update
    (p ← p · (1 − lr·wd)) as bitsandbytes' AdamW8bit does."""

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_8bit_size: int = 4096, paged: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size=min_8bit_size, paged=paged)


_MAPS: dict[torch.device, object] = {}


@functools.cache
def _kernel_module():
    """qtune.kernels.adam8bit, imported on the first fused step (it imports Triton)."""
    from ..kernels import adam8bit

    return adam8bit


def _device_maps(device: torch.device):
    """The kernel's StateMaps on `device`, made once."""
    from ..kernels.adam8bit import StateMaps

    if device not in _MAPS:
        m1, _, m2, _ = state_maps()
        _MAPS[device] = StateMaps.build(m1, m2, device)
    return _MAPS[device]


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 device tensor of `values`, copied without blocking the host."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
