#!/usr/bin/env bash
# Verifies lens_fast on a CUDA GPU in about 8 minutes (H100/H200), writing one log and a JSON of the
# results and figures to OUT (default gpu_check/):
#   1. builds the extension in place (pip install -e, offline, CUDA sources for this GPU only);
#   2. runs every `cuda`-marked test, the checks most likely to find a defect first:
#      reward_iou's last-arrival protocol against the C++ result over many repeated launches,
#      the CUDA RLE round trip, the fused decoder's outputs and gradients (under PyTorch's default
#      precision settings and with TF32 off), then every other CUDA test;
#   3. runs the GPU benchmarks with short rounds.
# Usage: tools/gpu_check.sh [OUT] [--no-build]
#   --no-build  test the lens_fast already installed in this Python (no compiler needed).
# Wheels of test references missing on a bare machine (segment-anything, pycocotools, torchmetrics,
# ...) are installed from LENS_FAST_WHEELS (default .whl/) when that folder holds any; without them
# the tests and benchmarks that need them are skipped, and the JSON lists the skip reasons.
# Without a GPU it still runs (a dry run): CUDA tests and benchmarks are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=gpu_check
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    -*) echo "unknown option $arg (usage: tools/gpu_check.sh [OUT] [--no-build])" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
PYTHON=${PYTHON:-python3}
WHEELS=${LENS_FAST_WHEELS:-.whl}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)

# step NAME TIMEOUT_S JUNIT COMMAND...: runs COMMAND, logs it, records
# "name<TAB>exit code<TAB>seconds<TAB>JUnit XML file (- for none)" in steps.tsv.
step() {
  local name=$1 limit=$2 junit=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  echo
  echo "=== $name (limit ${limit}s, at +$(( t0 - start ))s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$junit" >> "$STEPS"
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 ))s"
  return 0
}

echo "lens_fast GPU check, $(date -u +%FT%TZ), output in $OUT"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: no GPU visible: a dry run (CUDA tests and benchmarks will be skipped)"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step "install wheels from $WHEELS" 120 - "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
else
  echo "no wheels in $WHEELS/: tests that need segment-anything, pycocotools, ... skip if those are missing"
fi

if [ "$BUILD" = 1 ]; then
  if [ -z "${LENS_FAST_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
    [ -n "$cap" ] && export LENS_FAST_CUDA_ARCHS="${cap}-real"  # only this GPU's code: a faster build
  fi
  command -v nvcc > /dev/null && export LENS_FAST_CUDA=${LENS_FAST_CUDA:-1}  # nvcc present: CUDA sources required
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  step "build" 300 - "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e .
fi

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors)
# pytest STEP_NAME TIMEOUT_S JUNIT_NAME ARGS...: a pytest step writing OUT/JUNIT_NAME.
pytest_step() {
  local name=$1 limit=$2 junit="$OUT/$3.xml"
  shift 3
  step "$name" "$limit" "$junit" "${PYTEST[@]}" "$@" --junitxml="$junit"
}
FIRST=(tests/test_reward_iou.py tests/test_rle.py tests/test_nn_fuse_mask_decoder.py)
pytest_step "reward_iou last arrival vs C++" 120 junit-reward_iou -m cuda tests/test_reward_iou.py
pytest_step "CUDA RLE round trip" 90 junit-rle -m cuda tests/test_rle.py
pytest_step "fused decoder outputs and gradients" 150 junit-decoder -m cuda tests/test_nn_fuse_mask_decoder.py
pytest_step "other CUDA tests" 120 junit-other -m cuda tests "${FIRST[@]/#/--ignore=}"
pytest_step "GPU benchmarks" 180 junit-bench bench -k cuda --benchmark-only --benchmark-min-rounds=3 \
  --benchmark-max-time=0.05 --benchmark-warmup=on --benchmark-warmup-iterations=1 \
  --benchmark-json="$OUT/benchmarks.json"

"$PYTHON" tools/gpu_check_report.py "$OUT"
rc=$?
echo "total: $(( $(date +%s) - start ))s; log $LOG; figures $OUT/gpu_check.json"
exit $rc
