#!/usr/bin/env bash
# One GPU call: the whole test suite on this machine's versions, the gpu-marked tests, and the
# bitsandbytes parity script (args go to it). Run from the repo root with .whl carried. With pytest-xdist
# in .whl (bash ../shared/device/wheelhouse.sh pytest-xdist==3.8.0 execnet==2.1.1) the gpu-marked tests
# run on 8 workers (about 5 minutes on an H100 instead of over 8), without their printed lines.
set -uo pipefail
source scripts/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tee $OUT/pytest_all.log | grep -E '^(FAILED|ERROR)|passed|failed' | tail -20
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "-s")
python3 -m pytest -q -m gpu $workers tests -p no:cacheprovider 2>&1 | tee $OUT/pytest_gpu.log | grep -v '^Loading\|^Writing' | grep -E "rel diff|load:|passed|failed|FAILED|Error" | tail -25
python3 scripts/bnb_parity.py "$@" 2>&1 | tee $OUT/bnb_parity.log | tail -3
