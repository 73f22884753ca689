"""4-bit kernels against bitsandbytes and plain bf16, in one process on one GPU.

    python scripts/bench_kernels.py

Dequantize (13824x5120 and 4096x4096, NF4 + double quant, to bf16): qtune's Triton kernel, the torch
reference, bitsandbytes' dequantize_4bit; GB/s counts packed bytes read + bf16 written. Forward
Y = X @ W^T at M = 1, 16, 256, 4096 (K=5120, N=13824, bf16): qtune Linear4bit (dequantize + cuBLAS),
bitsandbytes Linear4bit, bf16 nn.Linear. Median of CUDA-event timings (triton.testing.do_bench).
"""

from __future__ import annotations

import json
import os

import torch
from triton.testing import do_bench

from qtune.nn import Linear4bit
from qtune.quant import quantize_4bit
from qtune.quant.functional import dequantize_4bit
from qtune.quant.reference import dequantize_4bit as reference_dequant


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    rows = []
    for shape in ((13824, 5120), (4096, 4096)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = quantize_4bit(w, 64, "nf4", True)
        pb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        nbytes = packed.numel() + w.numel() * 2
        t_q = do_bench(lambda: dequantize_4bit(packed, state, torch.bfloat16), return_mode="median")
        t_r = do_bench(lambda: reference_dequant(packed, state, torch.bfloat16), return_mode="median")
        t_b = do_bench(lambda: F.dequantize_4bit(pb, sb), return_mode="median")
        assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), reference_dequant(packed, state, torch.bfloat16))
        rows.append({"op": "dequantize", "shape": shape, "qtune_ms": t_q, "reference_ms": t_r, "bnb_ms": t_b})
        print(f"dequantize {shape}: qtune {t_q * 1e3:.0f} us ({nbytes / t_q / 1e6:.0f} GB/s), torch reference "
              f"{t_r * 1e3:.0f} us, bitsandbytes {t_b * 1e3:.0f} us -> {t_b / t_q:.2f}x bitsandbytes")
    lin = torch.nn.Linear(5120, 13824, bias=False, device="cuda", dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin, double_quant=True)
    b = bnb.nn.Linear4bit(5120, 13824, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                          compress_statistics=True)
    b.load_state_dict(lin.state_dict())
    b = b.cuda()
    for m in (1, 16, 256, 4096):
        x = torch.randn(m, 5120, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            t_q = do_bench(lambda: q(x), return_mode="median")
            t_b = do_bench(lambda: b(x), return_mode="median")
            t_f = do_bench(lambda: lin(x), return_mode="median")
        rows.append({"op": "forward", "M": m, "qtune_ms": t_q, "bnb_ms": t_b, "bf16_ms": t_f})
        print(f"forward M={m:5}: qtune {t_q * 1e3:7.0f} us, bitsandbytes {t_b * 1e3:7.0f} us, bf16 {t_f * 1e3:7.0f} us "
              f"-> {t_b / t_q:.2f}x bitsandbytes, {t_q / t_f:.2f}x bf16 time")
    with open(os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
