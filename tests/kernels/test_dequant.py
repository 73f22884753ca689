"""The Triton dequantize kernel against the torch reference (interpreter on the CPU, small shapes;
real sizes on the GPU): equal to the bit, every element written."""

import functools

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


@pytest.mark.gpu
def test_plan_launch_matches_the_first_launch(monkeypatch):
    """After the first launch for a weight, later ones replay its plan with only the output's address
    changed: new outputs get the first launch's bits, another weight and an output that is not 16-byte
    aligned get plans of their own; `decoder` replays the plan where there is one."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA")
    from qtune.kernels import dequant, launch

    monkeypatch.setattr(dequant, "_PLANS", {})
    ws = [torch.randn(1000, 2048, device=DEVICE) for _ in range(2)]
    quantized = [quantize_4bit(w, 64, "nf4", True) for w in ws]
    run = lambda p, s, out=None: kernel_dequant(p, s.absmax, s.code, s.shape, 64, torch.bfloat16, s.nested_tensors,
                                                out=out)
    firsts = [run(p, s) for p, s in quantized]
    if not launch.C_LAUNCH:
        assert not dequant._PLANS
        pytest.skip("plans need Triton 3.6's C launcher")
    assert len(dequant._PLANS) == 2
    for (p, s), first in zip(quantized, firsts):
        assert torch.equal(first, reference_dequant(p, s, torch.bfloat16))
        out = torch.full_like(first, float("nan"))
        assert run(p, s, out) is out and torch.equal(out, first)
    assert len(dequant._PLANS) == 2
    p, s = quantized[0]
    odd = torch.full((1000 * 2048 + 1,), float("nan"), device=DEVICE, dtype=torch.bfloat16)[1:].view(1000, 2048)
    assert torch.equal(run(p, s, odd), firsts[0]) and len(dequant._PLANS) == 3
    args = (s.absmax, s.code, s.shape, 64, torch.bfloat16, s.nested_tensors)
    decode = dequant.decoder(p, *args)
    assert decode.__name__ == "decode" and torch.equal(decode(), firsts[0]) and decode() is not decode()
    fresh, fresh_state = quantize_4bit(ws[0], 64, "fp4", True)  # no plan yet: dequantize_4bit itself
    decode = dequant.decoder(fresh, *(fresh_state.absmax, fresh_state.code, *args[2:]))
    assert isinstance(decode, functools.partial)
    assert torch.equal(decode(), reference_dequant(fresh, fresh_state, torch.bfloat16)) and len(dequant._PLANS) == 4


def test_strided_packed_bytes_are_read_in_order():
    """A strided packed tensor (every other byte of a larger one) decodes as its contiguous copy."""
    packed, state = quantize_4bit(torch.randn(8, 128, device=DEVICE), 64, "nf4", True)
    strided = torch.stack([packed.view(-1), torch.zeros_like(packed.view(-1))], 1)[:, 0]
    assert not strided.is_contiguous()
    want = reference_dequant(packed, state, torch.float32)
    got = kernel_dequant(strided, state.absmax, state.code, state.shape, 64, torch.float32, state.nested_tensors)
    assert torch.equal(got, want)
