"""Fused RMSNorm: kernel vs transformers' formula (values and input gradients), model wiring."""

import pytest
import torch
from conftest import rel_err

from qtune.nn.rmsnorm import RMSNormFn, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: rounding of a different summation order; 16-bit: the output is rounded to the dtype,
# about one unit in the last place of some elements (relative norm ~ eps of the dtype)
TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 100), (2, 5, 256)])
def test_kernel_matches_reference(dtype, shape):
    torch.manual_seed(shape[-1])
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    want = reference(x, w, 1e-5)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    got = RMSNormFn.apply(x, w, 1e-5)
    (got_dx,) = torch.autograd.grad(got, x, dy)
    assert got.dtype == dtype and got.shape == x.shape and got_dx.dtype == dtype
    assert rel_err(got, want) < TOL[dtype], rel_err(got, want)
    assert rel_err(got_dx, want_dx) < max(TOL[dtype], 1e-5) * 4, rel_err(got_dx, want_dx)


def test_llama_norms_use_it_and_the_model_is_unchanged(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qtune.hf.training import fuse_rmsnorm

    monkeypatch.setenv("QTUNE_BACKEND", "triton")  # the kernel, in the interpreter on the CPU
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    fused = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    for m in (ref, fused):
        m.requires_grad_(False)
        m.get_input_embeddings().weight.requires_grad_(True)  # a gradient through every norm
    assert fuse_rmsnorm(fused) == 5  # 2 layers x 2 + the final norm
    x = torch.randint(4, 90, (2, 12))
    out = [m(input_ids=x).logits for m in (ref, fused)]
    assert rel_err(out[1], out[0]) < 1e-5
    grads = [torch.autograd.grad(o.square().mean(), m.get_input_embeddings().weight)[0] for o, m in zip(out, (ref, fused))]
    assert rel_err(grads[1], grads[0]) < 1e-4
