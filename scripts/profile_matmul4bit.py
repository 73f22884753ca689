"""A few launches of the 4-bit forward at one M (13824x5120, NF4 + double quant, bf16), for Nsight
Compute:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        -k regex:"_gemv|_fwd" --launch-skip 3 --launch-count 1 python3 scripts/profile_matmul4bit.py 16

Optional launch config after M, as matmul4bit.forward takes it (BLOCK_M BLOCK_N warps stages LUT
kind SPLIT_K), e.g. `64 64 128 4 3 4 2` for the register-decode kernel at M=64.
"""

import sys

import torch

from qtune.kernels import matmul4bit as mm
from qtune.nn import Linear4bit

N, K = 13824, 5120

m = int(sys.argv[1]) if len(sys.argv) > 1 else 16
config = tuple(int(a) for a in sys.argv[2:]) or None
lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
q = Linear4bit.from_linear(lin, double_quant=True)
s = q.quant_state
x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
for _ in range(6):
    mm.forward(x, q.weight, s.absmax, s.code, N, 64, s.nested_tensors, config=config)
torch.cuda.synchronize()
print(f"M={m}: config {config or (mm._config(m, torch.bfloat16) if m > mm.GEMV_MAX_M else mm.GEMV_CONFIG)}")
