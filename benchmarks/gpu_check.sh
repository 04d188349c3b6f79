#!/usr/bin/env bash
# The GPU check as one prepared run. It fits 8 minutes on one H100 or H200 (machine start
# not counted; it took 126 s on an H200) with torch and Triton preinstalled and no package registry: it installs
# nothing from one. Every part has its own time budget and writes its results to OUT as soon
# as it ends, so a timeout keeps what ran:
#   facts.txt/.json  the GPU, its L2 and SMs, torch, Triton, the driver
#   install.txt      the npu_prefetch entry point: pip -e without build isolation, or a
#                    dist-info on PYTHONPATH when pip cannot
#   probe.json       benchmarks/probe_gpu_kernel.py: time per prefetch, warps, bytes per
#                    program, both lowerings, with and without the cache hint
#   gpu_tests.txt    pytest -m gpu tests/devices/test_cuda_prefetch.py
#   bench_micro.*    bench_gpu_prefetch.py --only micro --check
#   bench_b1.*, bench_b16.*  its Llama-3-8B-shaped layers at batch 1 and 16, predicted and
#                    measured speed-up side by side
#   summary.txt      one line per part: exit status and seconds
#
#   bash benchmarks/gpu_check.sh [OUT]   # OUT: a directory (default: $OUT, else ./gpu-results)
#
# Without a CUDA GPU (or with GPU_CHECK_DRY=1) it runs start to end in its "no GPU" form:
# machine facts without the GPU, then, part by part, what it would run; it exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-$ROOT/gpu-results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export ROOT OUT_DIR PY
TOTAL=${GPU_CHECK_BUDGET_S:-465} # seconds for every part together: 8 minutes with margin
export PYTHONUNBUFFERED=1
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"
FAILED=0

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null) ||
  echo "gpu_check: $PY cannot import torch (set PYTHON to the interpreter that has it)" |
  tee -a "$SUMMARY"
if [[ -n "${GPU_CHECK_DRY:-}" || "$CUDA" != 1 ]]; then
  DRY=1
  echo "gpu_check: no CUDA GPU here: the no-GPU form; each part says what it would run" |
    tee -a "$SUMMARY"
else
  DRY=
fi

# part NAME BUDGET_S OUTPUT COMMAND...: run COMMAND under min(budget, time left), its output
# to OUT/OUTPUT, one line to the summary. In the no-GPU form: say what it would run.
part() {
  local name=$1 budget=$2 output=$3
  shift 3
  local left=$((TOTAL - SECONDS))
  local limit=$((budget < left ? budget : left))
  if [[ -n "$DRY" ]]; then
    echo "gpu_check: would run $name (budget ${budget}s): $*" | tee -a "$SUMMARY"
    return 0
  fi
  if ((limit < 5)); then
    echo "gpu_check: $name skipped: out of time (${SECONDS}s of ${TOTAL}s used)" | tee -a "$SUMMARY"
    FAILED=1
    return 0
  fi
  local start=$SECONDS rc
  if declare -F "$1" >/dev/null; then # a function of this script: run it in its own bash
    timeout -k 3 "$limit" bash -c "$(declare -f "$1" registered); $1" >"$OUT_DIR/$output" 2>&1
  else
    timeout -k 3 "$limit" "$@" >"$OUT_DIR/$output" 2>&1
  fi
  rc=$?
  local verdict="exit $rc"
  ((rc == 124 || rc == 137)) && verdict="timed out after ${limit}s (exit $rc)"
  ((rc != 0)) && FAILED=1
  echo "gpu_check: $name: $verdict, $((SECONDS - start))s" | tee -a "$SUMMARY"
  tail -n 25 "$OUT_DIR/$output"
}

facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY - "$OUT_DIR/facts.json" <<'EOF'
import json, platform, sys
import torch
facts = {"python": platform.python_version(), "torch": torch.__version__}
try:
    import triton
    facts["triton"] = triton.__version__
except ImportError:
    facts["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                 l2_bytes=p.L2_cache_size, memory_bytes=p.total_memory, cuda=torch.version.cuda,
                 memory_clock_khz=getattr(p, "memory_clock_rate", None),
                 memory_bus_bits=getattr(p, "memory_bus_width", None))
else:
    facts["gpu"] = None
print(json.dumps(facts, indent=1))
open(sys.argv[1], "w").write(json.dumps(facts, indent=1))
EOF
}

# The torch_dynamo_backends entry point (backend="npu_prefetch") needs package metadata:
# an editable install without build isolation or dependencies (no registry needed), else a
# dist-info directory on PYTHONPATH that declares the same entry point, with the source tree.
registered() {
  (cd "$OUT_DIR" && $PY -c "import torch._dynamo as d, sys; sys.exit('npu_prefetch' not in d.list_backends())")
}
install() {
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" && registered && {
    echo "installed: pip install --no-deps --no-build-isolation --no-index -e ."
    return 0
  }
  echo "pip could not install the checkout: declaring the entry point on PYTHONPATH instead"
  local reg=$OUT_DIR/registry info
  info=$reg/fxprefetch_gpu_check-0.0.0.dist-info
  mkdir -p "$info"
  # the package as pip would lay it out: passes/ becomes fxprefetch.passes
  rm -rf "$reg/fxprefetch" && cp -r "$ROOT/fxprefetch" "$reg/fxprefetch" &&
    rm -rf "$reg/fxprefetch/passes" && cp -r "$ROOT/passes" "$reg/fxprefetch/passes"
  printf 'Metadata-Version: 2.1\nName: fxprefetch-gpu-check\nVersion: 0.0.0\n' >"$info/METADATA"
  printf '[torch_dynamo_backends]\nnpu_prefetch = fxprefetch.backend:npu_prefetch\n' \
    >"$info/entry_points.txt"
  echo "export PYTHONPATH=$reg:$ROOT" >"$OUT_DIR/pythonpath.sh"
  PYTHONPATH=$reg:$ROOT registered && echo "registered from $reg"
}

if [[ -z "$DRY" ]]; then
  part facts 20 facts.txt facts
  part install 45 install.txt install
  [[ -f "$OUT_DIR/pythonpath.sh" ]] && source "$OUT_DIR/pythonpath.sh"
else
  facts >"$OUT_DIR/facts.txt" 2>&1
  if [[ -f "$OUT_DIR/facts.json" ]]; then
    echo "gpu_check: facts (no GPU): $(tr -d '\n' <"$OUT_DIR/facts.json")" | tee -a "$SUMMARY"
  else
    echo "gpu_check: facts failed: see $OUT_DIR/facts.txt" | tee -a "$SUMMARY"
  fi
  echo "gpu_check: would run install (budget 45s): pip install --no-deps --no-build-isolation" \
    "--no-index -e . (else a dist-info with the entry point on PYTHONPATH)" | tee -a "$SUMMARY"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [[ -f benchmarks/probe_gpu_kernel.py ]]; then
  part probe 45 probe.txt $PY benchmarks/probe_gpu_kernel.py --out "$OUT_DIR/probe.json"
else
  echo "gpu_check: probe skipped: benchmarks/probe_gpu_kernel.py is not in this checkout" |
    tee -a "$SUMMARY"
fi
part gpu_tests 120 gpu_tests.txt \
  $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/devices/test_cuda_prefetch.py
part bench_micro 60 bench_micro.txt $PY benchmarks/bench_gpu_prefetch.py --only micro --check \
  --output "$OUT_DIR/bench_micro.json"
for batch in 1 16; do
  part "bench_b$batch" 85 "bench_b$batch.txt" $PY benchmarks/bench_gpu_prefetch.py --only layers \
    --check --batch "$batch" --output "$OUT_DIR/bench_b$batch.json"
done

echo "gpu_check: done in ${SECONDS}s; results in $OUT_DIR" | tee -a "$SUMMARY"
[[ -n "$DRY" ]] && exit 0
exit $FAILED
