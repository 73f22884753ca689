"""Linear8bit: LLM.int8()-style weights (int8, one absmax per output row) for inference and 8-bit
LoRA, in bitsandbytes' state-dict layout (`weight` int8, `SCB` float32, `weight_format`).

Forward (torch reference; the CPU path): activation columns holding a value of magnitude at least
`threshold` go through a high-precision matmul with the dequantized weight columns; the rest are
quantized row-wise to int8 and multiplied in exact integer arithmetic, then rescaled by the row and
column absmax. threshold=0 quantizes every column.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 round(x * 127 / rowmax), float32 rowmax) of a 2-D tensor; zero rows stay zero."""
    stats = x.abs().amax(dim=1).float()
    scale = torch.where(stats > 0, 127.0 / stats, torch.zeros_like(stats))
    return torch.round(x.float() * scale[:, None]).to(torch.int8), stats


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """x @ W^T in float32 for int8 weight rows `cb` with absmax `scb`, LLM.int8 decomposition."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    w_cols = None
    if threshold > 0:
        outliers = (x2.abs() >= threshold).any(dim=0)
        if bool(outliers.any()):
            w_cols = cb[:, outliers].float() * (scb[:, None] / 127.0)
            x_out = x2[:, outliers]
            x2 = x2.masked_fill(outliers[None, :], 0.0)
    ca, sca = quantize_rowwise(x2)
    acc = ca.double() @ cb.double().T  # exact integer products (int32 range), as an int8 GEMM gives
    y = acc.float() * (sca[:, None] * scb[None, :] / (127.0 * 127.0))
    if w_cols is not None:
        y = y + x_out @ w_cols.T
    return y.reshape(*x.shape[:-1], cb.shape[0])


class _Matmul8bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cb, scb, threshold):
        ctx.save_for_backward(cb, scb)
        return int8_linear(x, cb, scb, threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        cb, scb = ctx.saved_tensors
        w = cb.float() * (scb[:, None] / 127.0)
        return (grad_out.float() @ w).to(grad_out.dtype), None, None, None


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
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name} has {int((~torch.isfinite(w)).sum())} non-finite values; refusing to quantize it")
        cb, scb = quantize_rowwise(w.detach())
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
        y = _Matmul8bit.apply(x, self.weight, self.SCB, self.threshold)
        return y if self.bias is None else y + self.bias.to(y.dtype)

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
