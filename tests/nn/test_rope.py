"""Fused rotary embedding: kernel vs transformers' formula (values and input gradients)."""

import pytest
import torch
from conftest import rel_err

from qtune.nn.rope import RopeFn, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: rounding; 16-bit: the reference rounds each product and the sum to the dtype, the kernel
# once (relative norms ~ the dtype's epsilon)
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch_cos", [1, 2])
def test_kernel_matches_reference(dtype, batch_cos):
    torch.manual_seed(batch_cos)
    B, H, Hk, S, D = 2, 4, 2, 19, 16
    # q, k as transformers makes them: (B, S, H, D) projections viewed as (B, H, S, D)
    q = torch.randn(B, S, H, D, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hk, D, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    ang = torch.rand(batch_cos, S, D // 2, device=DEVICE) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    want = reference(q, k, cos, sin)
    want_g = torch.autograd.grad(want, (q, k), (dq, dk))
    got = RopeFn.apply(q, k, cos, sin)
    got_g = torch.autograd.grad(got, (q, k), (dq, dk))
    for g, w in zip((*got, *got_g), (*want, *want_g)):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w) < TOL[dtype], rel_err(g, w)


def test_llama_attention_uses_it_only_inside_its_layers(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from qtune.hf.training import fuse_rope

    from qtune.kernels import rope as kernel

    monkeypatch.setenv("QTUNE_BACKEND", "triton")  # the kernel, in the interpreter on the CPU
    calls, rotate = [], kernel.rotate
    monkeypatch.setattr(kernel, "rotate", lambda *a, **kw: calls.append(kw.get("inverse", False)) or rotate(*a, **kw))
    original = modeling_llama.apply_rotary_pos_emb
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    fused = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    assert fuse_rope(fused) == 2
    x = torch.randint(4, 90, (2, 12))
    out = [m(input_ids=x).logits for m in (ref, fused)]
    assert modeling_llama.apply_rotary_pos_emb is original  # restored after each layer
    assert rel_err(out[1], out[0]) < 1e-5
    grads = [torch.autograd.grad(o.square().mean(), m.model.layers[0].self_attn.q_proj.weight)[0]
             for o, m in zip(out, (ref, fused))]
    assert rel_err(grads[1], grads[0]) < 1e-4
    assert calls.count(False) == 4 and calls.count(True) == 4  # q and k of 2 layers, each way
