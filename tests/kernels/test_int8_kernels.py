"""The LLM.int8 Triton kernels against the torch reference of qtune/nn/linear8bit.py (interpreter on
the CPU at small odd shapes; real sizes on the GPU): outlier columns and int8 codes/absmax equal to
the bit, every output element written (outputs are poisoned first), matmul outputs within a bound.

Tolerances: the int8 products are summed exactly (int32 in the kernel, float64 holding integers in
the reference) and the epilogue repeats the reference's float32 operations in its order with one
rounding to the output dtype, so the two agree to the bit where both round alike (they do on the
CPU). The bounds leave room for a last-bit difference in float32 (fp32 output: 1e-6) or a flipped
final rounding of some elements (fp16/bf16 output: 1e-3, under one bf16 ulp, 2^-8 = 3.9e-3).
"""

import pytest
import torch
from conftest import rel_err
from torch import nn

from qtune.kernels import int8 as k
from qtune.nn import Linear8bit
from qtune.nn.linear8bit import int8_linear, int8_linear_kernel, quantize_rowwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 64, 48), (5, 96, 80), (33, 64, 80), (33, 96, 48)]  # (M, K, N)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}
THRESHOLD = 6.0


def make_inputs(M, K, N, dtype, seed, outliers=True, device=DEVICE):
    """x (M x K, dtype) with a few planted outlier columns (one value exactly at the threshold), a
    zero row when M > 2, and int8 weight rows of a random N x K matrix with their absmax."""
    torch.manual_seed(seed)
    x = torch.randn(M, K, device=device)  # |x| < 6 but for about 2 in 1e9
    if outliers:
        cols = torch.randperm(K, device=device)[:3]
        x[:, cols[:2]] *= 25
        x[0, cols[:2]] = torch.tensor([30.0, -20.0], device=device)
        x[0, cols[2]] = -THRESHOLD  # |x| >= threshold counts
    if M > 2:
        x[M // 2] = 0
    cb, scb = quantize_rowwise(torch.randn(N, K, device=device) * 0.05)
    return x.to(dtype), cb, scb, torch.randn(N, device=device).to(dtype)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_columns_and_quantize_rows_match_reference(M, K, N, dtype):
    x, _, _, _ = make_inputs(M, K, N, dtype, seed=M * K + N)
    outliers = (x.float().abs() >= THRESHOLD).any(0)
    mask = k.outlier_columns(x, THRESHOLD)
    assert mask.dtype == torch.uint8 and torch.equal(mask.bool(), outliers) and int(outliers.sum()) == 3
    for m in (mask, None):
        want_codes, want_absmax = quantize_rowwise(x.float() if m is None else x.float().masked_fill(outliers, 0))
        codes = torch.full((M, K), -128, dtype=torch.int8, device=DEVICE)  # poisoned: never a code
        absmax = torch.full((M,), float("nan"), device=DEVICE)
        got = k.quantize_rows(x, m, codes, absmax)
        assert got[0] is codes and got[1] is absmax
        assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,add", [(False, False), (True, False), (True, True)])
def test_int8_matmul_epilogue_matches_reference(M, K, N, dtype, bias, add):
    x, cb, scb, b = make_inputs(M, K, N, dtype, seed=M + K * N, outliers=False)
    ca, sca = quantize_rowwise(x.float())
    extra = torch.randn(M, N, device=DEVICE) if add else None
    want = (ca.double() @ cb.double().T).float() * (sca[:, None] * scb[None, :] / (127.0 * 127.0))
    want = want + (extra if add else 0) + (b.float() if bias else 0)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    got = k.int8_matmul(ca, sca, cb, scb, dtype, b if bias else None, extra, out=out)
    assert got is out and bool(torch.isfinite(out).all())
    assert rel_err(out, want.to(dtype)) <= TOL[dtype]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold,bias", [(THRESHOLD, False), (THRESHOLD, True), (0.0, True)])
def test_int8_linear_kernel_matches_reference(M, K, N, dtype, threshold, bias):
    x, cb, scb, b = make_inputs(M, K, N, dtype, seed=3 * M + K + N)
    b = b if bias else None
    want = int8_linear(x, cb, scb, threshold, b).to(dtype)
    got = int8_linear_kernel(x, cb, scb, threshold, b)
    assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype]


def test_no_outlier_column_takes_the_plain_path():
    x, cb, scb, _ = make_inputs(5, 96, 48, torch.float32, seed=1, outliers=False)
    assert not bool(k.outlier_columns(x, THRESHOLD).any())
    assert rel_err(int8_linear_kernel(x, cb, scb, THRESHOLD), int8_linear(x, cb, scb, THRESHOLD)) <= 1e-6


def test_linear8bit_dispatches_to_the_kernels(monkeypatch):
    torch.manual_seed(0)
    layer = Linear8bit.from_linear(nn.Linear(96, 80).to(DEVICE), threshold=THRESHOLD)
    layer.bias.requires_grad_(True)
    x0 = make_inputs(10, 96, 80, torch.float32, seed=2)[0].reshape(2, 5, 96)

    def run(backend):
        monkeypatch.setenv("QTUNE_BACKEND", backend)
        layer.bias.grad = None
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        (y * torch.linspace(-1, 1, 80, device=DEVICE)).sum().backward()
        return y, x.grad, layer.bias.grad

    calls = []
    matmul = k.int8_matmul
    monkeypatch.setattr(k, "int8_matmul", lambda *a, **kw: calls.append(1) or matmul(*a, **kw))
    y_ref, gx_ref, gb_ref = run("torch")
    assert not calls
    y, gx, gb = run("triton")
    assert calls == [1] and y.shape == (2, 5, 80)
    assert rel_err(y, y_ref) <= 1e-6 and torch.equal(gx, gx_ref) and torch.equal(gb, gb_ref)

    lin = nn.Linear(96, 80).to(DEVICE, torch.bfloat16)  # quantizing a weight: the kernel gives the same codes
    quantize = k.quantize_rows
    monkeypatch.setattr(k, "quantize_rows", lambda *a, **kw: calls.append(2) or quantize(*a, **kw))
    by_kernel = Linear8bit.from_linear(lin)
    assert calls == [1, 2]
    monkeypatch.setenv("QTUNE_BACKEND", "torch")
    by_reference = Linear8bit.from_linear(lin)
    assert torch.equal(by_kernel.weight, by_reference.weight) and torch.equal(by_kernel.SCB, by_reference.SCB)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
def test_real_sizes_on_gpu(M):
    K, N, dtype = 5120, 13824, torch.bfloat16
    x, cb, scb, b = make_inputs(M, K, N, dtype, seed=M, device="cuda")
    outliers = (x.float().abs() >= THRESHOLD).any(0)
    mask = k.outlier_columns(x, THRESHOLD)
    assert torch.equal(mask.bool(), outliers)
    codes = torch.full((M, K), -128, dtype=torch.int8, device="cuda")
    absmax = torch.full((M,), float("nan"), device="cuda")
    k.quantize_rows(x, mask, codes, absmax)
    want_codes, want_absmax = quantize_rowwise(x.float().masked_fill(outliers, 0))
    assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    k.int8_matmul(codes, absmax, cb, scb, dtype, b, None, out=out)
    want = int8_linear(x.float().masked_fill(outliers, 0), cb, scb, 0.0, b).to(dtype)
    assert bool(torch.isfinite(out).all()) and rel_err(out, want) <= TOL[dtype]
    for threshold in (THRESHOLD, 0.0):
        want = int8_linear(x, cb, scb, threshold, b).to(dtype)
        assert rel_err(int8_linear_kernel(x, cb, scb, threshold, b), want) <= TOL[dtype]
