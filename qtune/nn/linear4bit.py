"""Linear4bit: a frozen 4-bit weight (bitsandbytes layout) + optional bias, for QLoRA."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import check_packed_size, check_quant_args, dequantize_4bit, quantize_4bit
from ..quant.state import NestedState, QuantState, dtype_name

COMPUTE_DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64 for gradient checks


class Matmul4bit(torch.autograd.Function):
    """Y = X @ deq(W)^T + b. The weight is frozen: backward returns dX = dY @ deq(W) (and the bias
    gradient), dequantizing again instead of saving a full-precision weight or saving X."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None):
        ctx.state = state
        ctx.save_for_backward(packed)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, dequantize_4bit(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_4bit(packed, ctx.state, grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None):
    """x @ deq(W)^T (+ bias) in x's dtype, differentiable in x and bias."""
    return Matmul4bit.apply(x, packed, state, bias)


class Linear4bit(nn.Module):
    """nn.Linear with a frozen NF4/FP4 weight. Its state dict uses bitsandbytes' keys (`weight`,
    `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`, `weight.nested_quant_map`],
    `weight.quant_state.bitsandbytes__<type>`), so either library loads the other's checkpoints.

    Inputs are cast to `compute_dtype`; the output comes back in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
                 device: torch.device | str | None = None) -> None:
        """An empty layer (zero weight) to be filled by `load_state_dict`; see `from_linear`."""
        super().__init__()
        check_quant_args(quant_type, blocksize)
        if compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype {compute_dtype} is not supported; allowed: "
                            f"{', '.join(dtype_name(t) for t in COMPUTE_DTYPES)}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        packed, state = quantize_4bit(torch.zeros(out_features, in_features, device=device), blocksize,
                                      quant_type, double_quant, quant_storage)
        self._set_quantized(packed, state)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: torch.dtype | None = None,
                    quant_storage: torch.dtype = torch.uint8, name: str = "weight") -> Linear4bit:
        """Quantize an nn.Linear's weight (on its device); the bias is kept as is.
        compute_dtype defaults to the weight's dtype. `name` labels the weight in errors."""
        w = linear.weight
        if w.dim() != 2:
            raise ValueError(f"{name} must be a 2-D matrix (out_features, in_features); got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"{name} dtype {dtype_name(w.dtype)} is not a float; allowed: "
                            f"{', '.join(dtype_name(t) for t in FLOAT_DTYPES)}")
        check_quant_args(quant_type, blocksize)
        layer = cls.__new__(cls)  # skip __init__: it would quantize a zero matrix first
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = w.shape
        layer.compute_dtype = compute_dtype or w.dtype
        with torch.no_grad():
            layer._set_quantized(*quantize_4bit(w.detach(), blocksize, quant_type, double_quant, quant_storage, name))
        b = linear.bias
        layer.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        return layer

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Hold the packed weight as a frozen parameter and the state's tensors as non-persistent
        buffers (so .to()/.cuda() move them); the state dict is written in bitsandbytes' layout."""
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("quant_map", state.code, persistent=False)
        nested = state.nested
        for key, value in (("nested_absmax", nested and nested.absmax), ("nested_quant_map", nested and nested.code),
                           ("nested_offset", nested and nested.offset)):
            self.register_buffer(key, value, persistent=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> QuantState:
        """A view of this layer's quantization state (shares its tensors)."""
        nested = None
        if self.double_quant:
            nested = NestedState(absmax=self.nested_absmax, code=self.nested_quant_map, offset=self.nested_offset)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          code=self.quant_map, nested=nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight decoded to `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return matmul_4bit(x.to(self.compute_dtype), self.weight, self.quant_state, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Device moves apply to the packed weight and the quant state, dtype casts never do:
        # model.half() must not reinterpret packed bytes held as a float quant_storage, nor round absmax.
        device = fn(torch.empty(0, device=self.weight.device)).device
        frozen = {id(t) for t in (self.weight, *self._buffers.values()) if t is not None}
        return super()._apply(lambda t: t.to(device) if id(t) in frozen else fn(t), recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.to_dict().items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Takes the packed weight and its quant state out of state_dict (a per-module copy) and
        # leaves the bias to nn.Module.
        key, qs_prefix = prefix + "weight", prefix + "weight."
        qs_keys = [k for k in state_dict if k.startswith(qs_prefix)] if key in state_dict else []
        if key in state_dict:
            if not qs_keys:
                raise ValueError(f"{key} has no quant state ({qs_prefix}absmax, {qs_prefix}quant_map, "
                                 f"{qs_prefix}quant_state.bitsandbytes__<nf4|fp4>); it is not a 4-bit checkpoint")
            state = QuantState.from_dict({k[len(qs_prefix):]: state_dict.pop(k) for k in qs_keys})
            shape = (self.out_features, self.in_features)
            if tuple(state.shape) != shape:
                raise ValueError(f"{key}: checkpoint holds shape {tuple(state.shape)}; this layer is {shape}")
            packed = state_dict.pop(key)
            check_packed_size(packed, state, key)
            device = self.weight.device
            self._set_quantized(packed.to(device).reshape(-1, 1), state.to(device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if qs_keys and key in missing_keys:  # loaded above, popped before nn.Module looked
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={dtype_name(self.compute_dtype)}")
