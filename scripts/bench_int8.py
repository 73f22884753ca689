"""LLM.int8 forward: qtune Linear8bit (Triton kernels) against bitsandbytes Linear8bitLt and bf16
F.linear, in one process on one GPU.

    python scripts/bench_int8.py               # CUDA; writes bench_int8.json to $OUT (or .)
    python scripts/bench_int8.py --cpu-smoke   # qtune's kernel path only, tiny sizes, Triton interpreter

Y = X @ W^T at M = 1, 16, 256, 4096 (K=5120, N=13824), bf16 activations, threshold 6.0, for typical
activations (randn: no column reaches 6, so no outlier matmul) and for activations with a few planted
outlier columns (the decomposition's outlier path). Both int8 layers hold the same int8 weights
(qtune loads bitsandbytes' state dict). Median of CUDA-event timings (triton.testing.do_bench).
Printed per row: times, bitsandbytes time / qtune time, qtune time / bf16 time, and the relative
error of qtune's output against bitsandbytes' and against the bf16 product.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SIZES = {"gpu": dict(K=5120, N=13824, Ms=(1, 16, 256, 4096)), "smoke": dict(K=96, N=80, Ms=(1, 5))}
N_OUTLIER_COLUMNS = 6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _time_ms(fn, cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _activations(m: int, k: int, case: str, device: str) -> torch.Tensor:
    x = torch.randn(m, k, device=device)
    if case == "outliers":  # a few feature columns ~20x larger, as in large language models
        cols = torch.randperm(k, device=device)[:N_OUTLIER_COLUMNS]
        x[:, cols] *= 20
    return x.to(torch.bfloat16)


def _layers(K: int, N: int, cuda: bool):
    """(bf16 nn.Linear, qtune Linear8bit, bitsandbytes Linear8bitLt or None, how qtune was loaded)."""
    from qtune.nn import Linear8bit

    device = "cuda" if cuda else "cpu"
    lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    if not cuda:
        return lin, Linear8bit.from_linear(lin, threshold=6.0), None, "from_linear"
    import bitsandbytes as bnb

    b = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
    b.load_state_dict(lin.state_dict())
    b = b.cuda()  # quantizes to int8 + SCB
    q = Linear8bit(K, N, bias=False, threshold=6.0, device=device, dtype=torch.bfloat16)
    try:  # the very int8 codes bitsandbytes made, through its state-dict layout
        q.load_state_dict(b.state_dict())
        how = "bnb state dict"
    except Exception as e:  # noqa: BLE001 - report and fall back to quantizing the same bf16 weights
        print(f"loading bitsandbytes' state dict failed ({type(e).__name__}: {e}); quantizing the bf16 weights")
        q = Linear8bit.from_linear(lin, threshold=6.0)
        how = "from_linear"
    return lin, q, b, how


def bench_int8(rows: list, smoke: bool = False) -> None:
    """Time the int8 forward of qtune (and on CUDA bitsandbytes and bf16) at each M and activation
    case; print a table and append one dict per measurement to `rows`."""
    cuda = not smoke
    if cuda:
        import bitsandbytes

        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    size = SIZES["smoke" if smoke else "gpu"]
    K, N = size["K"], size["N"]
    lin, q, b, how = _layers(K, N, cuda)
    print(f"K={K} N={N} bf16 activations, threshold 6.0; qtune weights: {how}")
    print(f"{'case':9} {'M':>5} {'qtune us':>9} {'bnb us':>9} {'bf16 us':>9} {'bnb/qtune':>9} {'qtune/bf16':>10} "
          f"{'err vs bnb':>10} {'err vs bf16':>11}")
    for case in ("randn", "outliers"):
        for m in size["Ms"]:
            torch.manual_seed(m)
            x = _activations(m, K, case, lin.weight.device.type)
            with torch.no_grad():
                yq = q(x)
                yf = lin(x)
                t_q = _time_ms(lambda: q(x), cuda)
                t_f = _time_ms(lambda: lin(x), cuda)
                yb = b(x) if b is not None else None
                t_b = _time_ms(lambda: b(x), cuda) if b is not None else float("nan")
            row = {"op": "int8_forward", "case": case, "M": m, "K": K, "N": N, "qtune_ms": t_q, "bnb_ms": t_b,
                   "bf16_ms": t_f, "err_vs_bnb": _rel(yq, yb) if yb is not None else None, "err_vs_bf16": _rel(yq, yf)}
            rows.append(row)
            err_b = f"{row['err_vs_bnb']:.2e}" if yb is not None else "-"
            print(f"{case:9} {m:5} {t_q * 1e3:9.0f} {t_b * 1e3:9.0f} {t_f * 1e3:9.0f} {t_b / t_q:9.2f} "
                  f"{t_q / t_f:10.2f} {err_b:>10} {row['err_vs_bf16']:11.2e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="qtune's kernel path on the CPU at tiny sizes")
    args = ap.parse_args(argv)
    if args.cpu_smoke:  # before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["QTUNE_BACKEND"] = "triton"
    elif not torch.cuda.is_available():
        sys.exit("error: needs CUDA (or --cpu-smoke)")
    rows: list = []
    bench_int8(rows, smoke=args.cpu_smoke)
    if not args.cpu_smoke:
        with open(os.path.join(os.environ.get("OUT", "."), "bench_int8.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
