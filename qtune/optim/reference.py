"""Torch reference of the blockwise 8-bit Adam step: the CPU path and the oracle of the kernel.

The math is bitsandbytes' blockwise 8-bit Adam: dequantize both moments, update them, step the
parameter with bias corrections folded into `step_size` and `eps_hat`, then requantize each
moment with its block's new absmax (nearest code of the dynamic map; ties to the smaller magnitude).
"""

from __future__ import annotations

import functools

import torch

from ..quant.codes import dynamic_map

BLOCK = 256  # values per absmax block of an 8-bit state


@functools.cache
def state_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, its midpoints, unsigned map, its midpoints), float32 on the CPU. Midpoints
    are (a + b) * 0.5 in float32, the same arithmetic as the kernel."""
    m1, m2 = dynamic_map(True), dynamic_map(False)
    return m1, (m1[:-1] + m1[1:]) * 0.5, m2, (m2[:-1] + m2[1:]) * 0.5


def _blocks(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    return torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32 values of an 8-bit state, flat."""
    m1, _, m2, _ = state_maps()
    code = (m1 if signed else m2).to(codes.device)
    return (_blocks(code[codes.reshape(-1).long()]) * absmax[:, None]).reshape(-1)[: codes.numel()]


def quantize_state(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 absmax per block of 256) of a float32 state: the nearest code of
    x * (1/absmax), ties to the smaller magnitude. A negative first moment never rounds to +0
    (bitsandbytes keeps its sign: it moves to the next negative code)."""
    m1, mid1, m2, mid2 = state_maps()
    code, mids = (m1, mid1) if signed else (m2, mid2)
    blocks = _blocks(x)
    absmax = blocks.abs().amax(1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # one division per block
    scaled = blocks * inv[:, None]
    scaled = scaled.reshape(-1)[: x.numel()]
    idx = torch.bucketize(scaled.abs(), mids.to(x.device))  # on the non-negative half, ties to the smaller
    if signed:  # the negative half mirrors it; a negative moment never rounds to +0
        idx = torch.where(scaled < 0, (254 - idx).clamp_min(0), idx)
        idx = torch.where((scaled < 0) & (idx == 127), 126, idx)
    return idx.to(torch.uint8), absmax


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, step: int) -> tuple[float, float]:
    """(step_size, eps_hat) with Adam's bias corrections folded in, computed in float64:
    p += step_size * m / (sqrt(v) + eps_hat)."""
    corr1 = 1 - beta1**step
    corr2 = (1 - beta2**step) ** 0.5
    return -lr * corr2 / corr1, corr2 * eps


def adam_step(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, decoupled: bool, step: int) -> None:
    """One Adam(W) step of one tensor in place. `state` holds `state1`/`state2` (uint8 codes, with
    float32 `absmax1`/`absmax2`) or float32 `state1`/`state2`. Elements whose gradient is not
    finite keep their parameter and restart their moments from zero, as in bitsandbytes."""
    step_size, eps_hat = (torch.tensor(v, dtype=torch.float32).item() for v in step_scalars(lr, beta1, beta2, eps, step))
    eight_bit = "absmax1" in state
    pf, gf = p.detach().reshape(-1).float(), g.reshape(-1).float()
    if weight_decay and not decoupled:  # rounded once, as the kernel's fused multiply-add does
        wd32 = torch.tensor(weight_decay, dtype=torch.float32).double()
        gf = (gf.double() + wd32 * pf.double()).float()
    finite = torch.isfinite(gf)
    gf = torch.where(finite, gf, torch.zeros_like(gf))
    if eight_bit:
        s1 = dequantize_state(state["state1"], state["absmax1"], True)
        s2 = dequantize_state(state["state2"], state["absmax2"], False)
    else:
        s1, s2 = state["state1"].reshape(-1), state["state2"].reshape(-1)
    s1 = torch.where(finite, s1 * beta1 + (1 - beta1) * gf, torch.zeros_like(s1))
    s2 = torch.where(finite, s2 * beta2 + (1 - beta2) * gf * gf, torch.zeros_like(s2))
    new = pf + step_size * (s1 / (s2.sqrt() + eps_hat))
    if weight_decay and decoupled:
        new = new * (1 - lr * weight_decay)
    p.detach().copy_(torch.where(finite, new, pf).view_as(p))
    if eight_bit:
        c1, a1 = quantize_state(s1, True)
        c2, a2 = quantize_state(s2, False)
        state["state1"].copy_(c1.view_as(state["state1"]))
        state["state2"].copy_(c2.view_as(state["state2"]))
        state["absmax1"].copy_(a1)
        state["absmax2"].copy_(a2)
    else:
        state["state1"].copy_(s1.view_as(state["state1"]))
        state["state2"].copy_(s2.view_as(state["state2"]))
