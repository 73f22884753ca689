"""The Triton quantize kernels against the torch reference (interpreter on the CPU, small shapes;
real sizes on the GPU): the same packed bytes, absmax and nested state to the bit."""

import pytest
import torch

from qtune.quant import quantize_4bit
from qtune.quant import reference

from conftest import one_line

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 37), (64, 130), (257, 96)] if DEVICE == "cpu" else [(4096, 4096), (13824, 5120), (1, 4097)]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("QTUNE_BACKEND", "triton")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,double_quant", [(32, False), (64, True), (256, True), (4096, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_matches_reference(shape, quant_type, blocksize, double_quant, dtype):
    w = (torch.randn(shape, device=DEVICE) * torch.rand((), device=DEVICE).add(0.1)).to(dtype)
    w.view(-1)[: blocksize] = 0  # an all-zero block
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant, quant_storage=torch.bfloat16)
    want, want_state = reference.quantize_4bit(w, blocksize, quant_type, double_quant, torch.bfloat16)
    assert torch.equal(packed.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(state.absmax, want_state.absmax)
    if double_quant:
        for got, ref in zip(state.nested_tensors, want_state.nested_tensors):
            assert torch.equal(got, ref)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_single_non_finite_value_is_refused(double_quant, bad):
    """One NaN (which a plain max would skip) or one Inf anywhere in a block makes its absmax, and
    so the check, non-finite."""
    w = torch.randn(64, 256, device=DEVICE)
    w[17, 130] = bad
    with pytest.raises(ValueError) as e:
        quantize_4bit(w, 64, "nf4", double_quant)
    assert "1 non-finite value (NaN/Inf)" in one_line(e)


def test_non_finite_input_refused():
    w = torch.randn(40, 64, device=DEVICE)
    w[3, 5], w[7, 1] = float("nan"), float("-inf")
    with pytest.raises(ValueError) as e:
        quantize_4bit(w, name="model.layers.0.mlp.up_proj.weight")
    assert "2 non-finite values" in one_line(e) and "up_proj" in one_line(e)


@pytest.mark.gpu
def test_cached_launches_respecialize_on_alignment():
    """The cached direct launches (kernels/launch.py) key on what Triton specializes on: an input 4
    bytes off 16-byte alignment, after an aligned one of the same size, gets a kernel of its own."""
    from qtune.kernels import launch
    from qtune.kernels import quantize as kq

    big = torch.randn(64 * 1024 + 1, device=DEVICE)
    for w in (big[:-1], big[1:], big[:-1], big[1:]):  # aligned, misaligned, and again from the cache
        packed, state = quantize_4bit(w.view(64, 1024), 64, "nf4", False)
        want, want_state = reference.quantize_4bit(w.view(64, 1024), 64, "nf4", False, torch.uint8)
        assert torch.equal(packed.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(state.absmax, want_state.absmax)
    keys = {k[1] for k in launch._COMPILED if k[0] == id(kq._quant4_kernel)}
    assert any(("*fp32", "D") in k for k in keys) and any(("*fp32", "") in k for k in keys)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_at_thresholds_and_bucket_edges(quant_type):
    """The kernel's bucket search against the reference where it could slip: every rounding
    threshold, every 1/16 bucket edge, and the float32 neighbours of both, of either sign (each block
    starts with 1.0, so its absmax is 1 and the scaled values are the values themselves)."""
    from qtune.quant.codes import fp4_magnitude_tables, nf4_thresholds

    t = nf4_thresholds() if quant_type == "nf4" else fp4_magnitude_tables()[0]
    points = torch.cat([t, torch.arange(-16, 17, dtype=torch.float32) / 16])
    points = torch.cat([points, -points])
    points = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))])
    points = points.clamp(-1, 1)
    pad = -points.numel() % 63
    values = torch.cat([points, torch.zeros(pad)]).reshape(-1, 63)
    w = torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1, 64).to(DEVICE)
    packed, state = quantize_4bit(w, 64, quant_type, False)
    want, want_state = reference.quantize_4bit(w, 64, quant_type, False, torch.uint8)
    assert torch.equal(state.absmax, want_state.absmax) and bool((state.absmax == 1).all())
    assert torch.equal(packed.view(torch.uint8), want.view(torch.uint8))
