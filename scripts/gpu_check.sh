#!/usr/bin/env bash
# One GPU call: install the wheelhouse and qtune, run the gpu-marked tests and the parity script.
#   run on the device machine from the repo root, with .whl carried (see ../shared/device/wheelhouse.sh)
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed; using PYTHONPATH"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -m pytest -q tests -p no:cacheprovider 2>&1 | grep -E '^(FAILED|ERROR)|passed|failed' | tail -20  # the CPU suite too, on this machine's versions
python3 -m pytest -q -m gpu -s tests 2>&1 | tee $OUT/pytest_gpu.log | grep -v '^Loading\|^Writing' | tail -25
python3 scripts/bnb_parity.py "$@" 2>&1 | tee $OUT/bnb_parity.log
