#!/usr/bin/env bash
# One GPU call for the measurements the open issues need. Every command's whole output goes to a log
# under $OUT (it comes back with the call); only summaries are printed, so nothing is lost to a
# truncated console. Parts (default: all single-GPU ones): sweep kernels tests int8 qlora quality optim
# trainprof, t4, t4prof, and multigpu (needs 2 GPUs).
#   source scripts/gpu_env.sh; bash scripts/gpu_measure.sh sweep kernels
set -uo pipefail
source scripts/gpu_env.sh >/dev/null 2>&1 || exit 1
parts=${*:-sweep kernels tests qlora quality optim trainprof}
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
if has int8; then
  python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/hf/test_int8.py > "$OUT/pytest_int8.log" 2>&1
  grep -E "rel diff|checkpoint in|^FAILED|^E  |passed|failed" "$OUT/pytest_int8.log" | tail -12
fi
if has optim; then
  python3 scripts/bench_optim.py --sweep > "$OUT/bench_optim.log" 2>&1; grep -E "^  |^[0-9]+ tensors|TB/s" "$OUT/bench_optim.log"
fi
if has trainprof; then  # qtune.train's loop on the 4-layer 13B-shaped model, as bench_multigpu runs it
  python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench_multigpu as b; \
open('/tmp/trainprof_paths', 'w').write(b.cached_random_model('llama2-13b', 4, 'bfloat16') + ' ' + b.ensure_data('/tmp'))" \
    > "$OUT/trainprof_setup.log" 2>&1
  read -r model data < /tmp/trainprof_paths
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 scripts/profile_train.py recipe=llama2_7b model.name=$model \
    model.dtype=bfloat16 data.path=$data data.eval_fraction=0.01 train.seq_len=1024 train.micro_batch=1 \
    train.grad_accum=1 train.max_steps=10 train.eval_every=100000 train.save_every=100000 optim.schedule=constant \
    optim.warmup_steps=0 > "$OUT/profile_train.log" 2>&1
  sed -n '/steps in/,$p' "$OUT/profile_train.log" | head -40
fi
if has t4; then  # issue 9's full-model run: 40-layer 13B shape, recipe llama13b_t4, capped at 15 GiB like a T4
  [ -f /tmp/l13/config.json ] || python3 scripts/make_random_model.py --shape llama2-13b --out /tmp/l13 \
    > "$OUT/make_l13.log" 2>&1
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 -m qtune.train recipe=llama13b_t4 model.name=/tmp/l13 \
    data.path=$PWD/qtune/assets/tiny_instructions.jsonl data.packing=true train.max_steps=${T4_STEPS:-15} \
    train.log_every=5 train.eval_every=100000 train.save_every=100000 train.memory_limit_gib=15 \
    hydra.run.dir=/tmp/t4run > "$OUT/t4_train.log" 2>&1
  cp /tmp/t4run/metrics.jsonl "$OUT/t4_metrics.jsonl" 2>/dev/null
  python3 -c "import json, sys; sys.path.insert(0, 'scripts'); import bench_multigpu as b
recs = [json.loads(l) for l in open('/tmp/t4run/metrics.jsonl')]
steady, whole = b.steady_tokens_per_s(recs)
mem = max(r.get('gpu_mem_gib', 0) for r in recs)
print(f't4: steady {steady:.0f} tokens/s (whole run {whole:.0f}), peak {mem:.2f} GiB, loss', [round(r['loss'], 3) for r in recs if 'loss' in r])"
  tail -3 "$OUT/t4_train.log"
fi
if has t4prof; then  # the t4 run's loop profiled (scripts/profile_train.py): GPU time by kernel class
  [ -f /tmp/l13/config.json ] || python3 scripts/make_random_model.py --shape llama2-13b --out /tmp/l13 \
    > "$OUT/make_l13.log" 2>&1
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 scripts/profile_train.py --skip 3 --active 2 recipe=llama13b_t4 \
    model.name=/tmp/l13 data.path=$PWD/qtune/assets/tiny_instructions.jsonl data.packing=true train.max_steps=6 \
    train.log_every=100 train.eval_every=100000 train.save_every=100000 train.memory_limit_gib=15 \
    ${T4PROF_ARGS:-} > "$OUT/t4_profile.log" 2>&1
  sed -n '/steps in/,$p' "$OUT/t4_profile.log" | head -40
fi
if has multigpu; then  # work under /tmp (a datasets cache is too many files to bring back); logs to $OUT
  python3 scripts/bench_multigpu.py --gpus 2 --steps 12 --work /tmp/multigpu > "$OUT/bench_multigpu.log" 2>&1
  cp /tmp/multigpu/*.log /tmp/multigpu/*.json "$OUT/" 2>/dev/null
  for r in /tmp/multigpu/runs/*; do cp "$r/metrics.jsonl" "$OUT/metrics_$(basename "$r").jsonl" 2>/dev/null; done
  tail -12 "$OUT/bench_multigpu.log"
  for f in "$OUT"/*_2gpu.log; do [ -f "$f" ] && grep -E "Error|error" "$f" | tail -5; done
  true  # (no failed run's log: nothing to show, not a failure)
fi
