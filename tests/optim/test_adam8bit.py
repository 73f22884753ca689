"""Adam8bit / AdamW8bit: kernel vs reference, vs torch.optim.AdamW, state dicts, errors."""

import io

import pytest
import torch
from conftest import one_line, rel_err
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from qtune.kernels import adam8bit as kernel
from qtune.optim import Adam8bit, AdamW8bit
from qtune.optim import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_state(p, eight_bit):
    n = p.numel()
    if eight_bit:
        s1, s2 = torch.randn(n, device=p.device) * 1e-2, torch.rand(n, device=p.device) ** 4 * 1e-4
        c1, a1 = ref.quantize_state(s1, True)
        c2, a2 = ref.quantize_state(s2, False)
        return {"state1": c1, "state2": c2, "absmax1": a1, "absmax2": a2}
    return {"state1": torch.randn(n, device=p.device) * 1e-2, "state2": torch.rand(n, device=p.device) * 1e-4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eight_bit", [True, False])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("lut_shared", [True, False])
def test_kernel_matches_reference(dtype, eight_bit, decoupled, lut_shared, monkeypatch):
    monkeypatch.setattr(kernel, "LUT_SHARED", lut_shared)
    sizes = [4096, 5000, 256 * 9 + 7, 300] if DEVICE == "cpu" else [4096 * 64, 64 * 4096, 1_000_003, 300]
    params = [torch.randn(n, device=DEVICE).to(dtype) for n in sizes]
    grads = [torch.randn(n, device=DEVICE).to(dtype) * 1e-2 for n in sizes]
    grads[0][3] = float("nan")  # non-finite gradients leave their parameter and zero their moments
    grads[1][7] = float("inf")
    states = [_random_state(p, eight_bit) for p in params]
    steps = [3, 3, 3, 7]
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.1
    # kernel, on copies
    params_before = [p.clone() for p in params]
    kp = [p.clone() for p in params]
    ks = [{k: v.clone() for k, v in s.items()} for s in states]
    numels = [p.numel() for p in kp]
    seg = [-(-n // 16) * 16 for n in numels]
    elem_offs = [sum(seg[:i]) for i in range(len(seg))]
    blocks = [-(-n // 256) for n in numels]
    block_offs = [sum(blocks[:i]) for i in range(len(blocks))]
    flat = {}
    for k in ks[0]:
        offs = block_offs if k.startswith("absmax") else elem_offs
        flat[k] = ks[0][k].new_zeros(offs[-1] + ks[-1][k].numel())
        for s, off in zip(ks, offs):
            flat[k][off: off + s[k].numel()] = s[k]
    scal = torch.tensor([ref.step_scalars(lr, b1, b2, eps, s) for s in steps], dtype=torch.float32, device=DEVICE)
    m1, _, m2, _ = ref.state_maps()
    maps = kernel.StateMaps.build(m1, m2, DEVICE)
    p_offs, pa = kernel.element_offsets([p.data_ptr() for p in kp], kp[0].data_ptr(), kp[0].element_size())
    g_offs, ga = kernel.element_offsets([g.data_ptr() for g in grads], kp[0].data_ptr(), kp[0].element_size())
    dev = lambda xs: torch.tensor(xs, dtype=torch.int64, device=DEVICE)  # noqa: E731
    launch = kernel.LAUNCH[dtype]
    kernel.adam_step(kernel.work_list(numels, DEVICE, launch[0]), kp[0], dev(p_offs), dev(g_offs), min(pa, ga), dev(numels),
                     dev(elem_offs), dev(block_offs), scal, flat["state1"], flat["state2"], flat.get("absmax1"),
                     flat.get("absmax2"), maps, beta1=b1, beta2=b2,
                     decay=1 - lr * wd if decoupled else 1.0, l2=0.0 if decoupled else wd, launch=launch)
    got_states = {k: torch.cat([flat[k][o: o + s[k].numel()] for s, o in
                                zip(states, block_offs if k.startswith("absmax") else elem_offs)]) for k in flat}
    # reference, tensor by tensor
    for p, g, s, st in zip(params, grads, states, steps):
        ref.adam_step(p, g, s, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, decoupled=decoupled, step=st)
    got_p = torch.cat([p.float() for p in kp])
    want_p = torch.cat([p.float() for p in params])
    # float32 rounding apart: within 2 ulps of the parameter dtype plus 1e-3 of the step taken (both
    # round g + l2*p once, as an FMA; where the two nearly cancel, what rounding is left in the
    # step grows relative to it); 16-bit params rarely differ at all
    before = torch.cat([p.float() for p in params_before])
    # (2 ulps of the larger of the old and new value: where the decay nearly cancels the step, the
    # FMA's rounding is relative to the parameter, not to the small change)
    ulp = torch.finfo(dtype).eps * torch.maximum(want_p.abs(), before.abs()).clamp_min(torch.finfo(dtype).tiny)
    diff = (got_p - want_p).abs()
    print(f"params: {int((diff > 0).sum())} of {diff.numel()} differ, max {float((diff / ulp).max()):.2f} ulp")
    assert bool((diff <= 2 * ulp + (1e-3 if not decoupled else 1e-5) * (want_p - before).abs()).all())
    assert dtype == torch.float32 or int((diff > 0).sum()) <= diff.numel() // 1000
    want = {k: torch.cat([s[k] for s in states]) for k in states[0]}
    flat = got_states
    if eight_bit:
        assert rel_err(flat["absmax1"], want["absmax1"]) < 1e-6 and rel_err(flat["absmax2"], want["absmax2"]) < 1e-6
        for k in ("state1", "state2"):  # a code may differ where float32 rounding meets a midpoint
            delta = (flat[k].int() - want[k].int()).abs()
            print(f"{k}: {int((delta > 0).sum())} of {delta.numel()} codes differ")
            assert int(delta.max()) <= 1 and int((delta > 0).sum()) <= flat[k].numel() // 1000
    else:
        assert rel_err(flat["state1"], want["state1"]) < 1e-6 and rel_err(flat["state2"], want["state2"]) < 1e-6
    assert kp[0][3] == params[0][3] and kp[1][7] == params[1][7]  # kept where the gradient is not finite


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))


def _train(model, opt, steps, data):
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tracks_torch_adamw_on_an_mlp():
    torch.manual_seed(1)
    x = torch.randn(512, 32)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    a, b = _mlp(), _mlp()
    losses_a = _train(a, AdamW8bit(a.parameters(), lr=1e-3, weight_decay=1e-2, min_8bit_size=1024), 150, (x, y))
    losses_b = _train(b, torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=1e-2), 150, (x, y))
    assert losses_a[-1] < 0.3 * losses_a[0]
    assert abs(losses_a[-1] - losses_b[-1]) <= 0.01 * losses_b[-1] + 1e-4
    pa = torch.cat([p.detach().flatten() for p in a.parameters()])
    pb = torch.cat([p.detach().flatten() for p in b.parameters()])
    p0 = torch.cat([p.detach().flatten() for p in _mlp().parameters()])
    assert rel_err(pa - p0, pb - p0) < 0.15  # the path travelled agrees within 15% (measured: 0.08)


def test_tracks_torch_adam_on_linear_regression():
    torch.manual_seed(2)
    w_true = torch.randn(64, 64)
    x = torch.randn(512, 64)
    y = x @ w_true.T + 0.5 * torch.randn(512, 64)
    wa, wb = nn.Parameter(torch.zeros(64, 64)), nn.Parameter(torch.zeros(64, 64))
    oa, ob = Adam8bit([wa], lr=2e-2), torch.optim.Adam([wb], lr=2e-2)
    sa, sb = (torch.optim.lr_scheduler.CosineAnnealingLR(o, 600) for o in (oa, ob))
    for i in range(600):
        for w, o, s in ((wa, oa, sa), (wb, ob, sb)):
            o.zero_grad()
            ((x @ w.T - y) ** 2).mean().backward()
            o.step()
            s.step()
        if i in (10, 100, 300, 599):
            assert rel_err(wa, wb) < 0.05, i  # measured: 0.026 at step 10, 0.003 at the end
    la, lb = ((x @ wa.T - y) ** 2).mean().item(), ((x @ wb.T - y) ** 2).mean().item()
    assert abs(la - lb) <= 0.01 * lb  # measured: 0.6%


def _backend(monkeypatch, backend: str) -> str:
    """The device to run on: the kernel runs on CUDA, or in Triton's interpreter on the CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("QTUNE_BACKEND", backend)
    return "cpu"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resume_is_bit_identical(monkeypatch, backend):
    device = _backend(monkeypatch, backend)
    torch.manual_seed(3)
    x, y = torch.randn(64, 32, device=device), torch.randn(64, 1, device=device)
    model = _mlp().to(device)
    opt = AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=1024)
    _train(model, opt, 5, (x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 5, (x, y))
    buf.seek(0)
    saved = torch.load(buf)
    model2 = _mlp(seed=9).to(device)
    model2.load_state_dict(saved["model"])
    opt2 = AdamW8bit(model2.parameters(), lr=1e-3, min_8bit_size=1024)
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, 5, (x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), model2.parameters()):
        s, t = opt.state[p], opt2.state[q]
        assert s["step"] == t["step"] == 10 and all(torch.equal(s[k], t[k]) for k in s if k != "step")


def test_states_are_8bit_above_min_size_and_cost_2_03_bytes():
    big, small = nn.Parameter(torch.randn(64, 4096)), nn.Parameter(torch.randn(100))
    opt = AdamW8bit([big, small])
    (big.sum() + small.sum()).backward()
    opt.step()
    s = opt.state[big]
    assert s["state1"].dtype == torch.uint8 and s["absmax1"].numel() == big.numel() // 256
    assert opt.state[small]["state1"].dtype == torch.float32
    nbytes = sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
    assert nbytes / big.numel() == pytest.approx(2.03125)


def test_one_launch_per_group_however_many_tensors(monkeypatch):
    device = _backend(monkeypatch, "triton")
    params = [nn.Parameter(torch.randn(4096 + i, device=device)) for i in range(40)]
    params.append(nn.Parameter(torch.randn(10, device=device)))
    opt = AdamW8bit(params)
    calls = []
    real = kernel.adam_step
    monkeypatch.setattr(kernel, "adam_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(calls) == 4  # per step: one launch for the 40 8-bit tensors, one for the fp32-state one



def test_gradients_replaced_between_steps_are_read_where_they_now_live(monkeypatch):
    """The hot path reuses the gradients' addresses only while they hold: one gradient replaced
    (the old one kept alive, so the new one lands elsewhere) must be read from its new place."""
    device = _backend(monkeypatch, "triton")
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4096 + 16 * i, device=device)) for i in range(3)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p, t in zip(params, twins):
        p.grad, t.grad = torch.zeros_like(p), torch.zeros_like(t)
    opt, twin_opt = AdamW8bit(params, lr=1e-2), AdamW8bit(twins, lr=1e-2)  # the twins' gradients never move
    kept = []
    for step in range(6):
        for i, (p, t) in enumerate(zip(params, twins)):
            g = torch.randn_like(p)
            if i == step % 3:
                kept.append(p.grad)
                p.grad = g
            else:
                p.grad.copy_(g)
            t.grad.copy_(g)
        opt.step()
        twin_opt.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)

def test_schedulers_closures_and_groups():
    a, b = nn.Parameter(torch.randn(8192)), nn.Parameter(torch.randn(8192))
    opt = Adam8bit([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b0 = b.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (a**2).sum() + (b**2).sum()
        loss.backward()
        return loss

    l0 = opt.step(closure)
    sched.step()
    assert opt.param_groups[0]["lr"] == 5e-3
    assert opt.step(closure) < l0 and torch.equal(b, b0)


def test_step_hooks_and_profiler_range_still_work():
    """step skips torch's hook wrapper only while no hook or profiler is on."""
    p = nn.Parameter(torch.randn(64))
    opt = AdamW8bit([p], lr=1e-2)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt)))
    glob = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("global", 1)))
    p.grad = torch.ones_like(p)
    opt.step()
    assert seen == [("pre", True), ("post", True), ("global", 1)]
    for h in (pre, post, glob):
        h.remove()
    opt.step()
    assert len(seen) == 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#AdamW8bit.step" for e in prof.events())


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=0.0), "Invalid epsilon value: 0.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(weight_decay=-1e-2), "Invalid weight_decay value: -0.01"),
    (dict(min_8bit_size=0), "Invalid min_8bit_size: 0"),
    (dict(paged="yes"), "Invalid paged: 'yes' (True or False)"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError) as e:
        AdamW8bit([nn.Parameter(torch.randn(4))], **kwargs)
    assert match in one_line(e)


def test_state_dict_from_another_layout_is_refused():
    a = [nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(10))]
    opt = AdamW8bit(a, min_8bit_size=1024)
    for p in a:
        p.grad = torch.randn_like(p)
    opt.step()
    other = AdamW8bit([nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(10))], min_8bit_size=1024)
    with pytest.raises(ValueError) as e:
        other.load_state_dict(opt.state_dict())
    assert "parameter 0: saved state holds 8192 values; the parameter has shape (64, 64)" in one_line(e)
    with pytest.raises(ValueError) as e:
        AdamW8bit([nn.Parameter(torch.randn(64, 128))]).load_state_dict(opt.state_dict())
    assert "has 2 parameters; this optimizer's has 1" in one_line(e)


@pytest.mark.gpu
def test_state_saved_on_cuda_loads_on_cpu_and_continues_alike():
    torch.manual_seed(4)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    gpu_model = _mlp().cuda()
    opt = AdamW8bit(gpu_model.parameters(), lr=1e-3, min_8bit_size=1024)
    _train(gpu_model, opt, 5, (x.cuda(), y.cuda()))
    cpu_model = _mlp()
    cpu_model.load_state_dict({k: v.cpu() for k, v in gpu_model.state_dict().items()})
    cpu_opt = AdamW8bit(cpu_model.parameters(), lr=1e-3, min_8bit_size=1024)
    cpu_opt.load_state_dict(opt.state_dict())
    assert all(t.device.type == "cpu" for s in cpu_opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    _train(gpu_model, opt, 5, (x.cuda(), y.cuda()))
    _train(cpu_model, cpu_opt, 5, (x, y))
    for p, q in zip(gpu_model.parameters(), cpu_model.parameters()):
        assert rel_err(p.cpu(), q) < 1e-4  # kernel vs reference: float32 rounding apart


@pytest.mark.gpu
def test_paged_states_live_in_host_memory_and_step_bit_identically():
    torch.manual_seed(5)
    x, y = torch.randn(64, 32, device="cuda"), torch.randn(64, 1, device="cuda")
    runs = []
    for paged in (False, True):
        model = _mlp().cuda()
        opt = AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=1024, paged=paged)
        _train(model, opt, 5, (x, y))
        runs.append((model, opt))
    (model, opt), (pmodel, popt) = runs
    for p, q in zip(model.parameters(), pmodel.parameters()):
        assert torch.equal(p, q)  # the same kernel on the same values, wherever the states live
        s, t = opt.state[p], popt.state[q]
        assert all(torch.equal(s[k].cpu(), t[k]) for k in s if k != "step")
        assert all(t[k].device.type == "cpu" and t[k].is_pinned() for k in t if k != "step")
    saved = {k: v.clone() for k, v in pmodel.state_dict().items()}, popt.state_dict()
    _train(pmodel, popt, 3, (x, y))  # a paged optimizer resumes from its own state dict exactly
    model2 = _mlp(seed=9).cuda()
    model2.load_state_dict(saved[0])
    opt2 = AdamW8bit(model2.parameters(), lr=1e-3, min_8bit_size=1024, paged=True)
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, 3, (x, y))
    for p, q in zip(pmodel.parameters(), model2.parameters()):
        assert torch.equal(p, q)
