"""HashDropout: dropout whose mask is a function of (seed, salt, position), for LoRA inputs.

peft's LoRA layers call `lora_dropout[adapter](x)`; with torch's dropout, gradient checkpointing
must save and restore the random generator's state so that recomputation draws the same mask, which
CUDA graph capture does not allow. Here the mask is recomputed from a hash instead (same seed: same
mask), and the seed lives in one device tensor per model that the training loop advances once per
micro-batch (also inside a captured graph). The kernel is `qtune.kernels.dropout`; `reference` is its
torch twin (CPU path and test oracle).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import use_kernel

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keep_mask(n: int, seed: torch.Tensor, salt: int, p: float, device=None) -> torch.Tensor:
    """The bool keep mask of n elements (int64 arithmetic, as the kernel's uint32)."""
    from ..kernels.dropout import threshold

    key = _fmix32((seed.reshape(()).to(torch.int64) * 0x85EBCA77 + salt % 2**32) & _M32)
    idx = torch.arange(n, dtype=torch.int64, device=device if device is not None else seed.device)
    return _fmix32(((idx * 0x9E3779B1) & _M32) ^ key) >= threshold(p)


def reference(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    keep = keep_mask(x.numel(), seed, salt, p, x.device).view(x.shape)
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def hash_dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float,
                 seed_out: torch.Tensor | None = None) -> torch.Tensor:
    """dropout(x) by the hashed mask; `seed_out`, if given, receives the seed's value as used."""
    if x.dtype in FLOAT_DTYPES and use_kernel(x):
        from ..kernels import dropout

        return dropout.dropout(x, seed, salt, p, seed_out).view(x.shape)
    if seed_out is not None:
        seed_out.copy_(seed)
    return reference(x, seed, salt, p)


class HashDropoutFn(torch.autograd.Function):
    """y = dropout(x); dx = dropout(dy) with the same mask (the seed's value at forward is kept:
    the kernel writes it out, so a graph holds no extra copy per call)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: torch.Tensor, salt: int, p: float):
        used = torch.empty_like(seed)
        y = hash_dropout(x, seed, salt, p, used)
        ctx.save_for_backward(used)
        ctx.salt, ctx.p = salt, p
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (seed,) = ctx.saved_tensors
        return hash_dropout(grad, seed, ctx.salt, ctx.p), None, None, None


class DroppedLinearFn(torch.autograd.Function):
    """h = dropout(x) @ W^T (no bias; LoRA's A) that keeps x for the weight gradient instead of
    dropout(x): backward draws the mask again. Where x is kept anyway, or shared (q, k and v take the
    same x), that is one dropped copy less per adapter alive until backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, salt: int, p: float):
        used = torch.empty_like(seed)
        h = nn.functional.linear(hash_dropout(x, seed, salt, p, used), weight)
        ctx.save_for_backward(x, weight, used)
        ctx.salt, ctx.p = salt, p
        return h

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dh: torch.Tensor):
        x, weight, seed = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[1]:
            xd = hash_dropout(x, seed, ctx.salt, ctx.p)
            dw = (dh.reshape(-1, dh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dx = hash_dropout((dh @ weight).to(x.dtype), seed, ctx.salt, ctx.p)
        return dx, dw, None, None, None


class HashDropout(nn.Module):
    """nn.Dropout(p) with a hashed mask: active in training mode only. `seed` is shared by the
    model's HashDropout layers and `salt` tells them apart."""

    def __init__(self, p: float, seed: torch.Tensor, salt: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} is not supported; allowed: 0 <= p < 1")
        self.p, self.seed, self.salt = p, seed, salt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return HashDropoutFn.apply(x, self._seed_on(x), self.salt, self.p)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """linear(self(x), weight) without keeping the dropped x for backward (DroppedLinearFn)."""
        if not self.training or self.p == 0.0:
            return nn.functional.linear(x, weight)
        return DroppedLinearFn.apply(x, weight, self._seed_on(x), self.salt, self.p)

    def _seed_on(self, x: torch.Tensor) -> torch.Tensor:
        return self.seed if self.seed.device == x.device else self.seed.to(x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


def use_hash_dropout(model: nn.Module) -> torch.Tensor | None:
    """Replace the nn.Dropout of every LoRA layer (peft's `lora_dropout` dicts) by HashDropout
    sharing one seed tensor, which is returned (None when the model has no LoRA dropout); the loop
    adds one to it per micro-batch."""
    layers = [(m.lora_dropout, k) for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
              for k, d in m.lora_dropout.items() if isinstance(d, nn.Dropout) and d.p > 0]
    if not layers:
        return None
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    for salt, (holder, key) in enumerate(layers):
        holder[key] = HashDropout(holder[key].p, seed, salt)
    return seed
