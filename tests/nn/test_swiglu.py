"""Fused SwiGLU: kernel vs transformers' formula (values and gradients), and the MLP swap."""

import pytest
import torch
from conftest import rel_err

from qtune.nn.swiglu import SwiGLUFn, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: exp's rounding; 16-bit: the reference rounds silu's gradient product once more
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 4100)])  # partial blocks, more than one block
def test_kernel_matches_reference(dtype, shape):
    torch.manual_seed(shape[-1])
    g = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    u = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    dh = torch.randn(shape, device=DEVICE).to(dtype)
    want = reference(g, u)
    want_g = torch.autograd.grad(want, (g, u), dh)
    got = SwiGLUFn.apply(g, u)
    got_g = torch.autograd.grad(got, (g, u), dh)
    for x, w in zip((got, *got_g), (want, *want_g)):
        assert x.dtype == dtype and x.shape == w.shape
        assert rel_err(x, w) < TOL[dtype], rel_err(x, w)


def test_llama_mlp_uses_it(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qtune.hf.training import fuse_swiglu
    from qtune.kernels import swiglu as kernel

    monkeypatch.setenv("QTUNE_BACKEND", "triton")  # the kernel, in the interpreter on the CPU
    calls, fwd, bwd = [], kernel.forward, kernel.backward
    monkeypatch.setattr(kernel, "forward", lambda *a: calls.append("f") or fwd(*a))
    monkeypatch.setattr(kernel, "backward", lambda *a: calls.append("b") or bwd(*a))
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    fused = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    assert fuse_swiglu(fused) == 2
    x = torch.randint(4, 90, (2, 12))
    out = [m(input_ids=x).logits for m in (ref, fused)]
    assert rel_err(out[1], out[0]) < 1e-5
    grads = [torch.autograd.grad(o.square().mean(), m.model.layers[0].mlp.gate_proj.weight)[0]
             for o, m in zip(out, (ref, fused))]
    assert rel_err(grads[1], grads[0]) < 1e-4
    assert calls.count("f") == 2 and calls.count("b") == 2
