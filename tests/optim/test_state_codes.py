"""The kernel's 8-bit code search against the reference's on adversarial inputs: every code, every
midpoint and its float32 neighbours, every bucket edge and its neighbour, random values over all
decades, both signs."""

import pytest
import torch
import triton
import triton.language as tl

from qtune.kernels.adam8bit import StateMaps, _quantize_rows
from qtune.optim.reference import quantize_state, state_maps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _codes_kernel(x_ptr, absmax_ptr, out_ptr, map_ptr, SIGNED: tl.constexpr, SHARED: tl.constexpr):
    rows = tl.program_id(0) * 4 + tl.arange(0, 4)
    offs = rows[:, None] * 256 + tl.arange(0, 256)[None, :]
    q = _quantize_rows(tl.load(x_ptr + offs), tl.load(absmax_ptr + rows), map_ptr, SIGNED, SHARED)
    tl.store(out_ptr + offs, q)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shared", [True, False])  # midpoints gathered from shared memory, or loaded
def test_codes_match_the_reference_everywhere(signed, shared):
    m1, mid1, m2, mid2 = state_maps()
    code, mids = (m1, mid1) if signed else (m2, mid2)
    maps = StateMaps.build(m1, m2, DEVICE)
    n_rand = 100_000
    edges = torch.exp2(torch.arange(-40.0, 1.0))  # bucket edges: 128 per binade
    edges = torch.cat([edges, (edges * (1 + torch.arange(1, 128)[:, None] / 128)).reshape(-1)])
    edges = torch.cat([edges, -edges]) if signed else edges
    rand = torch.rand(n_rand) ** 12 * (torch.randint(0, 2, (n_rand,)) * 2 - 1 if signed else 1)
    x = torch.cat([code, mids, torch.nextafter(mids, torch.ones_like(mids)),
                   torch.nextafter(mids, -torch.ones_like(mids)), rand, edges, torch.nextafter(edges, -edges),
                   torch.tensor([0.0, -0.0, 1e-7, -1e-7, 1e-6, -1e-6, 0.1, -0.1, -1.0])])
    x = x.clamp(-1 if signed else 0, 1).float()
    blocks = -(-x.numel() // 1024) * 4
    xp = torch.zeros(blocks * 256)
    xp[: x.numel()] = x
    xp.view(-1, 256)[:, 0] = 1.0  # every block's absmax is 1: the kernel sees x itself
    out = torch.full((blocks * 256,), 77, dtype=torch.uint8, device=DEVICE)  # poisoned
    _codes_kernel[(blocks // 4,)](xp.to(DEVICE), torch.ones(blocks, device=DEVICE), out,
                                  maps.table1 if signed else maps.table2, SIGNED=signed, SHARED=shared)
    want, _ = quantize_state(xp, signed)
    assert torch.equal(out.cpu(), want)
