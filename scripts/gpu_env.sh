# Source on the device machine from the repo root: installs the carried wheelhouse (.whl/) and qtune.
#   source scripts/gpu_env.sh && python3 scripts/bench_optim.py
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
