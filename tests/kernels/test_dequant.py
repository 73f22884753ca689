"""The Triton dequantize kernel against the torch reference (interpreter on the CPU, small shapes;
real sizes on the GPU): equal to the bit, every element written."""

import pytest
import torch

from qtune.kernels.dequant import dequantize_4bit as kernel_dequant
from qtune.quant import quantize_4bit
from qtune.quant.reference import dequantize_4bit as reference_dequant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 37), (64, 130), (257, 96)] if DEVICE == "cpu" else [(4096, 4096), (13824, 5120), (1, 4097)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,double_quant", [(32, False), (64, True), (256, True), (4096, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_matches_reference(shape, quant_type, blocksize, double_quant, dtype):
    w = torch.randn(shape, device=DEVICE) * torch.rand((), device=DEVICE).add(0.1)
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    want = reference_dequant(packed, state, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    n = state.nested
    got = kernel_dequant(packed, state.absmax, state.code, state.shape, blocksize, dtype,
                         None if n is None else (n.absmax, n.code, n.offset), out=out)
    assert got is out and torch.equal(got, want)


def test_float_quant_storage_and_dispatch(monkeypatch):
    from qtune.quant import dequantize_4bit

    w = torch.randn(64, 96, device=DEVICE)
    packed, state = quantize_4bit(w, 64, "nf4", True, quant_storage=torch.bfloat16)
    want = reference_dequant(packed, state, torch.float16)
    monkeypatch.setenv("QTUNE_BACKEND", "triton")
    assert torch.equal(dequantize_4bit(packed, state, torch.float16), want)
