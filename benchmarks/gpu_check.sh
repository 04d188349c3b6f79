#!/usr/bin/env bash
# The GPU check as one prepared run. It fits 8 minutes on one H100 or H200 (machine start
# not counted; its parts before issue 26 took 126 s on an H200) with torch and Triton
# preinstalled and no package registry: it installs nothing from one. Every part has its
# own time budget and writes its results to OUT as soon as it ends, so a timeout keeps what
# ran. In the order they run:
#   facts.txt/.json  the GPU, its L2 and SMs, torch, Triton, the driver
#   install.txt      the npu_prefetch entry point: pip -e without build isolation, or a
#                    dist-info on PYTHONPATH when pip cannot
#   calibrate.txt, device-profile.json   fxprefetch calibrate: the device's measured
#                    constants (B_read, δ, each lowering's c_fixed and β, a small kernel)
#   gpu_tests.txt    pytest -m gpu tests/devices/test_cuda_prefetch.py
#   lowerings.*      bench_lowerings.py: side stream, compute stream and fused (extra
#                    programs of the window kernel) on dense and TP4-shaped decode layers
#                    (15 µs all-reduce stand-ins), measured beside predicted, the decision
#   bench_b1.*, bench_b16.*  bench_gpu_prefetch.py's Llama-3-8B-shaped layers at batch 1
#                    and 16 against plain inductor, with the default arm (the backend with
#                    no options), predicted and measured speed-up side by side
#   probe.json       benchmarks/probe_gpu_kernel.py: time per prefetch, warps, bytes per
#                    program, both lowerings, with and without the cache hint
#   bench_micro.*    bench_gpu_prefetch.py --only micro --check
#   summary.txt      one line per part (exit status and seconds), then the decision and
#                    the default arm's goal line
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT]   # OUT: a directory (default: $OUT,
#                                                    # else ./gpu-results)
#
# Without a CUDA GPU (or with --dry-run, or GPU_CHECK_DRY=1) it runs start to end in its
# "no GPU" form: machine facts without the GPU; the parts of issue 26 in their CPU forms
# (calibrate on a simulated H200, the lowering arms at tiny sizes with torch windows and
# the fused kernels compile-checked for sm_90); for every other part, what it would run.
# It exits 0 unless a CPU form failed.
set -uo pipefail
if [[ "${1:-}" == "--dry-run" ]]; then
  GPU_CHECK_DRY=1
  shift
fi
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

# cpu_part NAME OUTPUT COMMAND...: in the no-GPU form, run a part's CPU form (150 s at most)
cpu_part() {
  local name=$1 output=$2 start=$SECONDS rc
  shift 2
  timeout -k 3 150 "$@" >"$OUT_DIR/$output" 2>&1
  rc=$?
  ((rc != 0)) && FAILED=1
  echo "gpu_check: $name (no-GPU form): exit $rc, $((SECONDS - start))s: $*" | tee -a "$SUMMARY"
  tail -n 15 "$OUT_DIR/$output"
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

PROFILE=$OUT_DIR/device-profile.json
if [[ -n "$DRY" ]]; then
  cpu_part calibrate calibrate.txt $PY -m fxprefetch calibrate --simulate h200 --budget 10 \
    -o "$PROFILE"
  cpu_part lowerings lowerings.txt $PY benchmarks/bench_lowerings.py --dry-run \
    --device-profile "$PROFILE" --output "$OUT_DIR/lowerings.json"
fi
part calibrate 130 calibrate.txt $PY -m fxprefetch calibrate -o "$PROFILE"
part gpu_tests 90 gpu_tests.txt \
  $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/devices/test_cuda_prefetch.py
[[ -f "$PROFILE" || -n "$DRY" ]] && LOWERING_PROFILE=(--device-profile "$PROFILE") ||
  LOWERING_PROFILE=()
part lowerings 120 lowerings.txt $PY benchmarks/bench_lowerings.py "${LOWERING_PROFILE[@]}" \
  --budget 60 --output "$OUT_DIR/lowerings.json"
for batch in 1 16; do
  part "bench_b$batch" 100 "bench_b$batch.txt" $PY benchmarks/bench_gpu_prefetch.py \
    --only layers --check --batch "$batch" --output "$OUT_DIR/bench_b$batch.json"
done
if [[ -f benchmarks/probe_gpu_kernel.py ]]; then
  part probe 30 probe.txt $PY benchmarks/probe_gpu_kernel.py --out "$OUT_DIR/probe.json"
else
  echo "gpu_check: probe skipped: benchmarks/probe_gpu_kernel.py is not in this checkout" |
    tee -a "$SUMMARY"
fi
part bench_micro 45 bench_micro.txt $PY benchmarks/bench_gpu_prefetch.py --only micro --check \
  --output "$OUT_DIR/bench_micro.json"

# the verdicts, read from the parts' own output
grep -h "^decision:" "$OUT_DIR/lowerings.txt" 2>/dev/null | sed 's/^/gpu_check: /' |
  tee -a "$SUMMARY"
grep -h "^goal:" "$OUT_DIR"/bench_b*.txt 2>/dev/null | sed 's/^/gpu_check: bench_b: /' |
  tee -a "$SUMMARY"

echo "gpu_check: done in ${SECONDS}s; results in $OUT_DIR" | tee -a "$SUMMARY"
exit $FAILED
