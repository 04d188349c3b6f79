#!/usr/bin/env bash
# Issue #14's GPU checks as one prepared run (about 8 minutes on one H100 or H200, machine
# start not counted): what the machine has, the GPU tests, then bench_gpu_prefetch.py.
# Needs only what the GPU image holds (torch + Triton, pytest, hypothesis, transformers,
# setuptools); installs nothing from a registry. Results go to $OUT (default ./gpu-results).
#   bash benchmarks/gpu_check.sh          # everything
#   SMOKE=1 bash benchmarks/gpu_check.sh  # the benchmark's --smoke subset
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch, triton; p = torch.cuda.get_device_properties(0); print(
    'python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
    p.name, f'sm_{p.major}{p.minor}', p.L2_cache_size >> 20, 'MB L2')"
} 2>&1 | tee "$OUT/machine.txt"

# the torch_dynamo_backends entry point (backend="npu_prefetch") needs an install
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tee "$OUT/install.txt"
$PY -c "import torch._dynamo as d; assert 'npu_prefetch' in d.list_backends(), d.list_backends()" \
  || { echo "gpu_check: backend npu_prefetch not registered" | tee -a "$OUT/install.txt"; exit 1; }

timeout 300 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_prefetch.py \
  tests/test_counting.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests=${PIPESTATUS[0]}

timeout 330 $PY benchmarks/bench_gpu_prefetch.py ${SMOKE:+--smoke} \
  --output "$OUT/gpu_prefetch.json" 2>&1 | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench" | tee -a "$OUT/machine.txt"
exit $((tests || bench))
