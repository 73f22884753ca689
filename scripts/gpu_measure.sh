#!/usr/bin/env bash
# One GPU call for the measurements the open issues need. Every command's whole output goes to a log
# under $OUT (it comes back with the call); only summaries are printed, so nothing is lost to a
# truncated console. Parts (default: all): sweep kernels tests qlora quality optim.
#   source scripts/gpu_env.sh; bash scripts/gpu_measure.sh sweep kernels
set -uo pipefail
source scripts/gpu_env.sh >/dev/null 2>&1 || exit 1
parts=${*:-sweep kernels tests qlora quality optim}
has() { [[ " $parts " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if has sweep; then
  python3 scripts/bench_kernels.py --sweep > "$OUT/sweep.log" 2>&1; grep -E "^M=" "$OUT/sweep.log"
fi
if has kernels; then
  python3 scripts/bench_kernels.py > "$OUT/bench_kernels.log" 2>&1
  grep -E "^(device|dequantize|quantize|forward|fwd)|^(randn|outliers) " "$OUT/bench_kernels.log"
fi
if has tests; then
  python3 -m pytest -q -p no:cacheprovider -m gpu -s tests > "$OUT/pytest_gpu.log" 2>&1
  grep -E "rel diff|codes differ|^FAILED|^ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -25
fi
if has qlora; then
  python3 scripts/bench_qlora.py > "$OUT/bench_qlora.log" 2>&1; grep -E "^seq|tokens_per_s|peak_mem" "$OUT/bench_qlora.log"
fi
if has quality; then
  python3 scripts/bench_qlora.py --quality-steps 200 > "$OUT/bench_qlora_quality.log" 2>&1
  grep -E "^quality" "$OUT/bench_qlora_quality.log"
fi
if has optim; then
  python3 scripts/bench_optim.py > "$OUT/bench_optim.log" 2>&1; tail -8 "$OUT/bench_optim.log"
fi
