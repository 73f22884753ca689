"""RMSNorm with a frozen weight, as Llama-family models compute it, through one Triton kernel per
direction on CUDA (transformers' version is seven elementwise and reduction kernels forward and more
backward); `reference` is the same formula in torch (CPU path and test oracle)."""

from __future__ import annotations

import torch

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import use_kernel


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormFn(torch.autograd.Function):
    """y = w * (x / rms(x)).to(x.dtype); the gradient for x only (w frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        from ..kernels import rmsnorm

        y, rstd = rmsnorm.forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ..kernels import rmsnorm

        x, weight, rstd = ctx.saved_tensors
        return rmsnorm.backward(dy, x, weight, rstd), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel for CUDA (or QTUNE_BACKEND=triton) float tensors of one dtype with a frozen weight,
    else the reference."""
    if (use_kernel(x) and x.dtype == weight.dtype and x.dtype in FLOAT_DTYPES
            and not weight.requires_grad and x.shape[-1] <= 65536):
        return RMSNormFn.apply(x, weight, eps)
    return reference(x, weight, eps)
