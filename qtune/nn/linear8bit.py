"""Linear8bit: LLM.int8()-style weights (int8, one absmax per output row) for inference and 8-bit
LoRA, in bitsandbytes' state-dict layout (`weight` int8, `SCB` float32, `weight_format`).

Forward (torch reference; the CPU path): activation columns holding a value of magnitude at least
`threshold` go through a high-precision matmul with the dequantized weight columns; the rest are
quantized row-wise to int8 and multiplied in exact integer arithmetic, then rescaled by the row and
column absmax, and the bias added, before one rounding to the input's dtype. threshold=0 quantizes
every column. CUDA tensors (or QTUNE_BACKEND=triton) take the Triton kernels of qtune.kernels.int8,
which round exactly as this reference does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import check_finite, use_kernel


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 round(x * 127 / rowmax), float32 rowmax) of a 2-D tensor; zero rows stay zero."""
    stats = x.abs().amax(dim=1).float()
    # spelled as torch evaluates `127.0 / stats` (Tensor.__rtruediv__): a reciprocal, then a product
    scale = torch.where(stats > 0, stats.reciprocal() * 127.0, torch.zeros_like(stats))
    return torch.round(x.float() * scale[:, None]).to(torch.int8), stats


def outlier_product(x2: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                    outliers: torch.Tensor) -> torch.Tensor | None:
    """x2[:, outliers] @ W[:, outliers]^T in float32 with the weight columns dequantized, or None
    when no column is an outlier. One host synchronisation (the nonzero that sizes the gather)."""
    cols = outliers.nonzero().squeeze(1)
    if cols.numel() == 0:
        return None
    w_cols = cb[:, cols].float() * (scb[:, None] / 127.0)
    return x2[:, cols].float() @ w_cols.T


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float32 for int8 weight rows `cb` with absmax `scb`, LLM.int8
    decomposition (the torch reference of the kernels in qtune.kernels.int8, rounding as they do)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    extra = None
    if threshold > 0:
        outliers = (x2.abs() >= threshold).any(dim=0)
        extra = outlier_product(x2, cb, scb, outliers)
        if extra is not None:
            x2 = x2.masked_fill(outliers[None, :], 0.0)
    ca, sca = quantize_rowwise(x2)
    acc = ca.double() @ cb.double().T  # exact integer products (int32 range), as an int8 GEMM gives
    y = acc.float() * (sca[:, None] * scb[None, :] / (127.0 * 127.0))
    if extra is not None:
        y = y + extra
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], cb.shape[0])


def int8_linear_kernel(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear through the Triton kernels, in x's dtype: outlier columns found on the device,
    their product in torch as in the reference, quantization and the int8 GEMM with its fused
    epilogue in Triton. Host synchronisation only for the outlier gather (threshold > 0)."""
    from ..kernels import int8 as k

    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    mask = extra = None
    if threshold > 0:
        mask = k.outlier_columns(x2, threshold)
        extra = outlier_product(x2, cb, scb, mask.bool())
        if extra is None:
            mask = None
    codes, absmax = k.quantize_rows(x2, mask)
    y = k.int8_matmul(codes, absmax, cb.contiguous(), scb, x.dtype, bias, extra)
    return y.reshape(*x.shape[:-1], cb.shape[0])


class _Matmul8bit(torch.autograd.Function):
    """Y = X @ deq(W)^T + b through the LLM.int8 decomposition; the weight is frozen, so backward
    gives dX = dY @ deq(W) (and the bias gradient)."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias, threshold):
        ctx.save_for_backward(cb, scb)
        ctx.has_bias = bias is not None
        if use_kernel(x) and x.dtype in FLOAT_DTYPES:
            return int8_linear_kernel(x, cb, scb, threshold, bias)
        return int8_linear(x, cb, scb, threshold, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        cb, scb = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = cb.float() * (scb[:, None] / 127.0)
            grad_x = (grad_out.float() @ w).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


class Linear8bit(nn.Linear):
    """nn.Linear with a frozen int8 weight (LLM.int8). Built unquantized (float weight, e.g. on
    meta while loading) and quantized by `quantize_()` or by loading a float or 8-bit state dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: float = 6.0,
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=self.weight_dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype)) if bias else None
        self.register_buffer("SCB", torch.zeros(out_features, device=device, dtype=torch.float32))
        self.register_buffer("weight_format", torch.tensor(0, dtype=torch.uint8, device=device))  # row-major

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Linear8bit:
        layer = cls(linear.in_features, linear.out_features, bias=False, threshold=threshold, device="meta",
                    dtype=linear.weight.dtype)
        layer.weight_format = torch.tensor(0, dtype=torch.uint8, device=linear.weight.device)
        layer.quantize_(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @property
    def is_quantized(self) -> bool:
        return self.weight.dtype == torch.int8

    def quantize_(self, weight: torch.Tensor | None = None, name: str = "weight") -> Linear8bit:
        w = self.weight if weight is None else weight
        if tuple(w.shape) != (self.out_features, self.in_features) or not w.is_floating_point():
            raise ValueError(f"{name} must be a float matrix of shape {(self.out_features, self.in_features)}; "
                             f"got {w.dtype} {tuple(w.shape)}")
        check_finite(w, name)
        w = w.detach()
        if use_kernel(w) and w.dtype in FLOAT_DTYPES:  # same codes, without a float32 copy of the weight
            from ..kernels.int8 import quantize_rows

            cb, scb = quantize_rows(w.contiguous())
        else:
            cb, scb = quantize_rowwise(w)
        self.weight_dtype = w.dtype
        self.weight = nn.Parameter(cb, requires_grad=False)
        self.SCB = scb
        self.weight_format = torch.tensor(0, dtype=torch.uint8, device=cb.device)
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * (self.SCB[:, None] / 127.0)).to(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            raise RuntimeError("this Linear8bit holds no quantized weight yet: call quantize_() or load a state dict")
        return _Matmul8bit.apply(x, self.weight, self.SCB, self.bias, self.threshold)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        fmt = state_dict.get(prefix + "weight_format")
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"{prefix}weight_format={int(fmt)} is not supported; allowed: 0 (row-major)")
        key = prefix + "weight"
        if key in state_dict and state_dict[key].is_floating_point():  # a float checkpoint: quantize it
            w = state_dict.pop(key)
            self.quantize_(w, key)
            state_dict[prefix + "SCB"] = self.SCB
            state_dict[key] = self.weight
        elif key in state_dict and state_dict[key].dtype == torch.int8:
            self.weight = nn.Parameter(torch.empty_like(state_dict[key], device=self.weight.device), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")
