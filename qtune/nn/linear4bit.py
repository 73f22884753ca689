"""Linear4bit: a frozen 4-bit weight (bitsandbytes layout) + optional bias, for QLoRA."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import (check_packed_size, check_quant_args, dequantize_4bit, dequantize_4bit_rows,
                                quantize_4bit, row_chunk, use_kernel)
from ..quant.state import QuantState, dtype_name

COMPUTE_DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64 for gradient checks
# With `pieces` (Linear4bit.decode_in_pieces, the run config's quant.decode_in_pieces), dequantize +
# matmul decodes a weight of more than PIECE values in row pieces of at most that many (32 MiB in 16
# bits) where the decoded weight would be over PIECE_RATIO times the product's other large operand (Y
# forward, dX backward): with few rows (a 13B MLP's weight is 135 MiB against 10-27 MiB of activations
# at 1,024 tokens) the weight copy is the memory spike on top of the step's peak, in recomputation and
# backward. With many rows the activations dominate, and pieces are not worth their extra passes (dX
# is accumulated over them). Under PIECE_MIN_OTHER elements of Y or dX the product is host-bound and
# activations that small do not make the step's peak: whole weights there. Pieces trade time for
# memory, so they are off by default: the 13B T4 recipe's peak is 0.07 GiB lower with them (8.82
# against 8.89 GiB) at 5% of its tokens/s, and called eagerly on an H100 a 13B MLP weight's forward at
# 320-1,024 rows took 592-643 us in pieces against 148-282 whole, bitsandbytes 175-307
# (docs/benchmarks.md).
PIECE = 2**24
PIECE_RATIO = 4
PIECE_MIN_OTHER = 2**22


def _fused(t: torch.Tensor, state: QuantState, backward: bool):
    """The fused Triton kernels' module when they take this product (CUDA or QTUNE_BACKEND=triton,
    a float compute dtype, whole blocks per row, at most the module's measured fwd_max_m /
    BWD_MAX_M rows), else None."""
    if t.dtype not in FLOAT_DTYPES or not use_kernel(t) or len(state.shape) != 2:
        return None
    from ..kernels import matmul4bit

    max_m = matmul4bit.BWD_MAX_M if backward else matmul4bit.fwd_max_m(t)
    if t.numel() > max_m * t.shape[-1] or not matmul4bit.supported(state.shape[1], state.blocksize):
        return None
    return matmul4bit


class Matmul4bit(torch.autograd.Function):
    """Y = X @ deq(W)^T + b. The weight is frozen: backward returns dX = dY @ deq(W) (and the bias
    gradient), dequantizing again instead of saving a full-precision weight or saving X. On CUDA,
    few rows go through the fused dequant-matmul kernels, many through dequantize + cuBLAS."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
                pieces: bool = False):
        ctx.state, ctx.pieces = state, pieces
        ctx.save_for_backward(packed)
        ctx.has_bias = bias is not None
        y = _forward(x, packed, state, bias, pieces)
        # The backward's choice depends only on x's rows and device and on Y's dtype (dY's; under
        # autocast not x's). Made here, on the calling thread, it leaves the backward (in autograd's
        # device thread, where each call into torch costs more) a decode's launch and the matmul
        # wherever it decodes the whole weight.
        whole = ctx.needs_input_grad[0] and _fused(x, state, backward=True) is None
        whole = whole and _piece_rows(packed, state, x.numel(), pieces) >= state.shape[0]
        ctx.decode = (y.dtype, _decoder(packed, state, y.dtype)) if whole else None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0] and ctx.decode is not None and grad_out.dtype == ctx.decode[0]:
            grad_x = grad_out @ ctx.decode[1]()
        elif ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            state = ctx.state
            kernels = _fused(grad_out, state, backward=True)
            if kernels is not None:
                dx = kernels.backward(grad_out.reshape(-1, grad_out.shape[-1]).contiguous(), packed, state.absmax,
                                      state.code, state.shape[1], state.blocksize, state.nested_tensors)
                grad_x = dx.view(*grad_out.shape[:-1], state.shape[1])
            else:
                grad_x = _dx_in_pieces(grad_out, packed, state, ctx.pieces)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


# Matmul4bit's C++ apply, without Function.apply's Python (its functorch dead-wrapper scan and
# default-argument binding: ~9 us a call), which matmul_4bit needs only under functorch's transforms
# or while compiling.
_APPLY = super(torch.autograd.Function, Matmul4bit).apply


def _forward(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
             pieces: bool) -> torch.Tensor:
    kernels = _fused(x, state, backward=False)
    if kernels is not None:
        check_packed_size(packed, state)
        x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
        y = kernels.forward(x2, packed, state.absmax, state.code, state.shape[0], state.blocksize,
                            state.nested_tensors, bias)
        return y if x2 is x else y.view(*x.shape[:-1], state.shape[0])
    return _y_in_pieces(x, packed, state, bias, pieces)


def _decoder(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """dequantize_4bit(packed, state, dtype) as a function of no arguments: the kernels' decoder where
    they run, without the size check the forward made."""
    if dtype in FLOAT_DTYPES and use_kernel(packed):
        from ..kernels import dequant

        return dequant.decoder(packed, state.absmax, state.code, state.shape, state.blocksize, dtype,
                               state.nested_tensors)
    return functools.partial(dequantize_4bit, packed, state, dtype)


def _piece_rows(packed: torch.Tensor, state: QuantState, other: int, pieces: bool) -> int:
    """Rows of W per decoded piece: all of them unless `pieces` and, on the kernel path, the decoded
    weight would be over PIECE_RATIO times `other` elements (the product's other large operand), itself
    at least PIECE_MIN_OTHER."""
    if not pieces or not use_kernel(packed) or other < PIECE_MIN_OTHER or state.numel <= PIECE_RATIO * other:
        return state.shape[0]
    return row_chunk(state, PIECE)


def _y_in_pieces(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
                 pieces: bool) -> torch.Tensor:
    """X @ deq(W)^T (+ b), with `pieces` each piece of W's rows writing its own columns of Y."""
    n, k = state.shape
    rows = _piece_rows(packed, state, x.numel() // k * n, pieces)
    if rows >= n:
        return nn.functional.linear(x, dequantize_4bit(packed, state, x.dtype), bias)
    x2 = x.reshape(-1, k)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = dequantize_4bit_rows(packed, state, x.dtype, start, stop).t()
        if bias is None:
            torch.mm(x2, w, out=y[:, start:stop])
        else:
            torch.addmm(bias[start:stop], x2, w, out=y[:, start:stop])
    return y.view(*x.shape[:-1], n)


def _dx_in_pieces(dy: torch.Tensor, packed: torch.Tensor, state: QuantState, pieces: bool) -> torch.Tensor:
    """dY @ deq(W), with `pieces` each piece of W's rows adding its product into dX (one more rounding
    of dX per piece)."""
    n, k = state.shape
    rows = _piece_rows(packed, state, dy.numel() // n * k, pieces)
    if rows >= n:
        return dy @ dequantize_4bit(packed, state, dy.dtype)
    dy2 = dy.reshape(-1, n)
    dx = torch.empty(dy2.shape[0], k, dtype=dy.dtype, device=dy.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = dequantize_4bit_rows(packed, state, dy.dtype, start, stop)
        if start == 0:
            torch.mm(dy2[:, start:stop], w, out=dx)
        else:
            dx.addmm_(dy2[:, start:stop], w)
    return dx.view(*dy.shape[:-1], k)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                pieces: bool = False):
    """x @ deq(W)^T (+ bias) in x's dtype, differentiable in x and bias. Without a gradient to
    record, the product skips the autograd Function (its bookkeeping is host time a decode step pays).
    `pieces`: decode a weight that would dwarf the activations in row pieces (less memory, more time)."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return Matmul4bit.apply(x, packed, state, bias, pieces)
        return _APPLY(x, packed, state, bias, pieces)
    return _forward(x, packed, state, bias, pieces)


def _check_matrix(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix (out_features, in_features); got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name} dtype {dtype_name(w.dtype)} is not a float; allowed: "
                        f"{', '.join(dtype_name(t) for t in FLOAT_DTYPES)}")


class Params4bit(nn.Parameter):
    """The packed 4-bit weight. A distinct class so that code which casts every 16-bit parameter
    (peft's `prepare_model_for_kbit_training` skips classes named `Params4bit`) leaves a float
    `quant_storage` alone."""


class Linear4bit(nn.Linear):
    """nn.Linear with a frozen NF4/FP4 weight. Its state dict uses bitsandbytes' keys (`weight`,
    `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`, `weight.nested_quant_map`],
    `weight.quant_state.bitsandbytes__<type>`), so either library loads the other's checkpoints.

    A layer is built unquantized (a float `weight`, e.g. on the meta device while a model is being
    loaded) and quantized by `quantize_()`, by loading a float or 4-bit state dict, or directly by
    `from_linear`. Inputs are cast to `compute_dtype`; the output comes back in the input's dtype.
    It subclasses nn.Linear so that peft wraps it with its LoRA Linear ("all-linear" included).
    `decode_in_pieces` (default off) trades speed for a lower memory peak: see matmul_4bit.
    """

    decode_in_pieces = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: no weight initialisation, it is replaced anyway
        check_quant_args(quant_type, blocksize)
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype {compute_dtype} is not supported; allowed: "
                            f"{', '.join(dtype_name(t) for t in COMPUTE_DTYPES)}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.quant_storage = quant_type, blocksize, quant_storage
        self.compute_dtype = compute_dtype
        self.weight_dtype = dtype or torch.get_default_dtype()
        self._double_quant = double_quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=self.weight_dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype)) if bias else None
        self._state: QuantState | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: torch.dtype | None = None,
                    quant_storage: torch.dtype = torch.uint8, name: str = "weight") -> Linear4bit:
        """Quantize an nn.Linear's weight (on its device); the bias is kept as is.
        compute_dtype defaults to the weight's dtype. `name` labels the weight in errors."""
        w = linear.weight
        _check_matrix(w, name)
        layer = cls(w.shape[1], w.shape[0], bias=False, quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype, quant_storage=quant_storage,
                    device="meta", dtype=w.dtype)
        layer.quantize_(w, name)
        b = linear.bias
        layer.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        return layer

    @property
    def is_quantized(self) -> bool:
        return self._state is not None

    @property
    def double_quant(self) -> bool:
        return self._double_quant

    def quantize_(self, weight: torch.Tensor | None = None, name: str = "weight") -> Linear4bit:
        """Quantize `weight` (default: this layer's float weight) with this layer's settings, on
        the weight's device, and keep only the packed result. Returns self."""
        w = self.weight if weight is None else weight
        _check_matrix(w, name)
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{name} has shape {tuple(w.shape)}; this layer is "
                             f"{(self.out_features, self.in_features)}")
        with torch.no_grad():
            packed, state = quantize_4bit(w.detach(), self.blocksize, self.quant_type, self._double_quant,
                                          self.quant_storage, name)
        self._set_quantized(packed, state)
        return self

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Hold the packed weight as a frozen parameter and the QuantState as a plain attribute (not
        buffers: transformers re-creates non-persistent buffers after loading); `_apply` moves it."""
        self.weight = Params4bit(packed, requires_grad=False)
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.quant_storage = packed.dtype
        self.compute_dtype = self.compute_dtype or state.dtype
        self._double_quant = state.nested is not None
        self._state = state

    @property
    def quant_state(self) -> QuantState:
        """This layer's quantization state (absmax, code table, nested state, shape, dtype)."""
        self._check_quantized()
        return self._state

    def _check_quantized(self) -> None:
        if not self.is_quantized:
            raise RuntimeError("this Linear4bit holds no quantized weight yet: call quantize_() or load a state dict")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight decoded to `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state is None:
            self._check_quantized()
        dtype, bias = self.compute_dtype, self.bias  # (casts skipped where dtypes match: host time per call)
        bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        y = matmul_4bit(x if x.dtype == dtype else x.to(dtype), self.weight, state, bias, self.decode_in_pieces)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Device moves apply to the packed weight and the quant state, dtype casts never do:
        # model.half() must not reinterpret packed bytes held as a float quant_storage, nor round absmax.
        if not self.is_quantized:
            return super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.weight.device)).device
        weight = self.weight
        out = super()._apply(lambda t: t.to(device) if t is weight else fn(t), recurse)
        self._state = self._state.to(device)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            for key, value in self.quant_state.to_dict().items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Takes the weight and its quant state out of state_dict (a per-module copy): a 4-bit
        # checkpoint is loaded as is, a float weight is quantized with this layer's settings. The
        # bias is left to nn.Module.
        key, qs_prefix = prefix + "weight", prefix + "weight."
        qs_keys = [k for k in state_dict if k.startswith(qs_prefix)] if key in state_dict else []
        if qs_keys:
            self.load_quantized(state_dict.pop(key), {k[len(qs_prefix):]: state_dict.pop(k) for k in qs_keys}, key)
        elif key in state_dict:
            w = state_dict.pop(key)
            if not w.is_floating_point():
                raise ValueError(f"{key} is a packed {dtype_name(w.dtype)} tensor without its quant state "
                                 f"({qs_prefix}absmax, {qs_prefix}quant_map, {qs_prefix}quant_state.bitsandbytes__"
                                 f"<nf4|fp4>)")
            self.quantize_(w.to(self._target_device(w)), key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in missing_keys and self.is_quantized:  # loaded above, popped before nn.Module looked
            missing_keys.remove(key)

    def _target_device(self, incoming: torch.Tensor) -> torch.device:
        """Where loaded tensors go: the layer's device, or the checkpoint's while the layer is on meta."""
        return incoming.device if self.weight.device.type == "meta" else self.weight.device

    def load_quantized(self, packed: torch.Tensor, stats: dict[str, torch.Tensor], name: str = "weight") -> None:
        """Take a packed weight and its bitsandbytes-layout quant state (keys as in the state dict,
        without the `weight.` prefix), checking they fit this layer."""
        state = QuantState.from_dict(stats)
        shape = (self.out_features, self.in_features)
        if tuple(state.shape) != shape:
            raise ValueError(f"{name}: checkpoint holds shape {tuple(state.shape)}; this layer is {shape}")
        check_packed_size(packed, state, name)
        device = self._target_device(packed)
        self._set_quantized(packed.to(device).reshape(-1, 1), state.to(device))

    def extra_repr(self) -> str:
        compute = dtype_name(self.compute_dtype) if self.compute_dtype else "weight dtype"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={compute}")
