"""HashDropout: kernel vs torch reference, mask statistics, same mask in recomputation, LoRA wiring."""

import math

import pytest
import torch
from conftest import rel_err
from torch.utils.checkpoint import checkpoint

from qtune.nn.dropout import HashDropout, HashDropoutFn, keep_mask, reference, use_hash_dropout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2047, 2048 * 3 + 5])
def test_kernel_matches_reference(dtype, n):
    from qtune.kernels import dropout as kernel

    torch.manual_seed(n)
    x = torch.randn(n, device=DEVICE).to(dtype)
    seed = torch.tensor([12345], device=DEVICE)
    got = kernel.dropout(x, seed, salt=7, p=0.3)
    want = reference(x, seed, 7, 0.3)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_fraction_and_independence(p):
    n = 200_000
    seed = torch.tensor([3])
    a = keep_mask(n, seed, 0, p)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int((~a).sum()) - n * p) < 5 * sd  # dropped count within 5 standard deviations
    for other in (keep_mask(n, torch.tensor([4]), 0, p), keep_mask(n, seed, 1, p)):  # next seed, next salt
        both = int((~a & ~other).sum())  # independent masks: both drop ~ n p^2
        assert abs(both - n * p * p) < 5 * math.sqrt(n * p * p) + 1
    assert torch.equal(a, keep_mask(n, seed.clone(), 0, p))


@pytest.mark.parametrize("backend", ["", "triton"])  # the torch path, and the kernel writing out its seed
def test_gradient_uses_the_forward_mask_even_after_the_seed_moves(backend, monkeypatch):
    monkeypatch.setenv("QTUNE_BACKEND", backend)
    x = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    seed = torch.tensor([9], device=DEVICE)
    y = HashDropoutFn.apply(x, seed, 5, 0.25)
    seed += 1  # the loop's next micro-batch: must not change this one's backward
    g = torch.randn_like(y)
    y.backward(g)
    keep = keep_mask(x.numel(), torch.tensor([9]), 5, 0.25).view(x.shape).to(DEVICE)
    assert torch.equal(y, torch.where(keep, x * (1 / 0.75), 0.0))
    assert torch.allclose(x.grad, torch.where(keep, g / 0.75, 0.0))
    assert 0.6 < float(keep.float().mean()) < 0.9


@pytest.mark.parametrize("backend", ["", "triton"])
def test_dropped_linear_matches_dropout_then_linear_and_keeps_x_only(backend, monkeypatch):
    from qtune.nn.dropout import DroppedLinearFn

    monkeypatch.setenv("QTUNE_BACKEND", backend)
    torch.manual_seed(1)
    x = torch.randn(2, 24, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    seed, dh = torch.tensor([4], device=DEVICE), torch.randn(2, 24, 8, device=DEVICE)
    want = torch.nn.functional.linear(HashDropoutFn.apply(x, seed, 3, 0.3), w)
    want_g = torch.autograd.grad(want, (x, w), dh)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = DroppedLinearFn.apply(x, w, seed, 3, 0.3)
    seed += 1  # the next micro-batch's seed: this backward still draws the forward's mask
    got_g = torch.autograd.grad(got, (x, w), dh)
    for g, r in zip((got, *got_g), (want, *want_g)):
        assert rel_err(g, r) < 1e-6
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, no dropped copy


def test_checkpoint_recomputes_the_same_mask_without_rng_state():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32).to(DEVICE)
    drop = HashDropout(0.5, torch.tensor([1], device=DEVICE), salt=0).train()
    x = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    f = lambda t: lin(drop(t)).relu()  # noqa: E731
    f(x).sum().backward()
    want = x.grad.clone(), lin.weight.grad.clone()
    x.grad = lin.weight.grad = None
    torch.manual_seed(123)  # a moved generator would change torch's dropout mask, not this one
    checkpoint(f, x, use_reentrant=False, preserve_rng_state=False).sum().backward()
    assert torch.equal(x.grad, want[0]) and torch.equal(lin.weight.grad, want[1])


def test_identity_in_eval_and_bad_p():
    drop = HashDropout(0.2, torch.zeros(1, dtype=torch.int64), salt=0).eval()
    x = torch.randn(5)
    assert drop(x) is x
    with pytest.raises(ValueError, match="allowed: 0 <= p < 1"):
        HashDropout(1.0, torch.zeros(1, dtype=torch.int64), 0)


def test_lora_layers_get_hash_dropout_sharing_one_seed(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    seed = use_hash_dropout(model)
    drops = [m for m in model.modules() if isinstance(m, HashDropout)]
    assert seed is not None and len(drops) == 14 and all(d.seed is seed for d in drops)
    assert len({d.salt for d in drops}) == len(drops)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    model.train()
    x = torch.randint(4, 90, (1, 12))
    a = model(input_ids=x).logits
    assert torch.equal(a, model(input_ids=x).logits)  # same seed: same masks
    seed += 1
    assert use_hash_dropout(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")),
                                           LoraConfig(r=4, lora_dropout=0.0))) is None
