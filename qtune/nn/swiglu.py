"""SwiGLU (Llama's MLP activation, silu(gate) * up) through one Triton kernel each way on CUDA, in
place of transformers' three elementwise kernels forward and three backward; `reference` is
transformers' formula (CPU path and test oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import use_kernel


def reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """LlamaMLP's act_fn(gate) * up with act_fn SiLU."""
    return F.silu(g) * u


class SwiGLUFn(torch.autograd.Function):
    """silu(g) * u, with gradients for g and u."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        from ..kernels import swiglu

        ctx.save_for_backward(g, u)
        return swiglu.forward(g, u)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        from ..kernels import swiglu

        g, u = ctx.saved_tensors
        return swiglu.backward(dh, g, u)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The kernel for contiguous CUDA (or QTUNE_BACKEND=triton) float tensors of one shape and
    dtype, else the reference."""
    if (use_kernel(g) and g.shape == u.shape and g.dtype == u.dtype
            and g.dtype in FLOAT_DTYPES and g.is_contiguous() and u.is_contiguous()):
        return SwiGLUFn.apply(g, u)
    return reference(g, u)
