#!/usr/bin/env bash
# The whole GPU check in one device call (bench/README.md): install the carried diffusers wheels, run the GPU
# plan of bench/run_suite.py under a time budget, then the CUDA tests. Everything lands in $OUT:
# summary.md (the table), runs.json (every number), suite.log, gpu.txt, pytest.txt.
# Usage, from the repository root on the GPU machine:  BUDGET_S=170 bash bench/gpu_run.sh
set -u
OUT=${OUT:-/tmp/bench_out}
BUDGET_S=${BUDGET_S:-170}        # no benchmark run starts after this many seconds of the suite
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-60}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: carry .whl (see bench/README.md)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, diffusers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'diffusers', diffusers.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$OUT/gpu.txt"

(cd bench && python3 run_suite.py --plan gpu --out "$OUT" --budget-s "$BUDGET_S") 2>&1 | tee "$OUT/suite.log"

timeout "$TEST_TIMEOUT_S" python3 -m pytest -q -m gpu tests/test_cuda.py tests/test_speed_options.py 2>&1 \
    | tail -n 15 | tee "$OUT/pytest.txt"
