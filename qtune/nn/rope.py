"""Rotary position embedding (Llama's apply_rotary_pos_emb) through one Triton kernel per tensor on
CUDA, in place of transformers' eight elementwise kernels (slices, negation, concatenation,
broadcast products, sums) forward and as many backward; `reference` is transformers' formula."""

from __future__ import annotations

import torch

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import use_kernel


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' LlamaModel apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RopeFn(torch.autograd.Function):
    """(q, k) rotated; gradients for q and k (cos and sin are buffers)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from ..kernels import rope

        ctx.save_for_backward(cos, sin)
        return rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        from ..kernels import rope

        cos, sin = ctx.saved_tensors
        return rope.rotate(dq, cos, sin, inverse=True), rope.rotate(dk, cos, sin, inverse=True), None, None


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
    """Drop-in for transformers' function (both signatures): the kernel for (B, H, S, D) CUDA (or
    QTUNE_BACKEND=triton) float tensors of one dtype with an even D, else the reference."""
    if (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and q.shape[-1] % 2 == 0
            and use_kernel(q) and q.dtype == k.dtype == cos.dtype == sin.dtype
            and q.dtype in FLOAT_DTYPES
            and not (cos.requires_grad or sin.requires_grad)):
        return RopeFn.apply(q, k, cos, sin)
    return reference(q, k, cos, sin, unsqueeze_dim)
