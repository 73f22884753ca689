"""The kernel's 8-bit code search against the reference's (torch.bucketize) on adversarial inputs:
every code, every midpoint and its float32 neighbours, random values over all decades."""

import pytest
import torch
import triton
import triton.language as tl

from qtune.kernels.adam8bit import _dynamic_index
from qtune.optim.reference import state_maps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _index_kernel(x_ptr, out_ptr, mids_ptr, N: tl.constexpr, SIGNED: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    tl.store(out_ptr + offs, _dynamic_index(tl.load(x_ptr + offs), mids_ptr, SIGNED))


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_everywhere(signed):
    m1, mid1, m2, mid2 = state_maps()
    code, mids = (m1, mid1) if signed else (m2, mid2)
    up, down = torch.ones_like(mids), -torch.ones_like(mids)
    n_rand = 100_000
    rand = torch.rand(n_rand) ** 12 * (torch.randint(0, 2, (n_rand,)) * 2 - 1 if signed else 1)
    x = torch.cat([code, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), rand,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-7, -1e-7, 1e-6, -1e-6, 0.1, -0.1])])
    x = x.clamp(-1 if signed else 0, 1).float()
    n = -(-x.numel() // 1024) * 1024
    xp = torch.zeros(n)
    xp[: x.numel()] = x
    out = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)  # poisoned
    _index_kernel[(n // 1024,)](xp.to(DEVICE), out, mids.to(DEVICE), N=1024, SIGNED=signed)
    want = torch.bucketize(xp, mids)
    assert torch.equal(out.cpu().long(), want)
