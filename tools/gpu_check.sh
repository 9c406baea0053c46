#!/usr/bin/env bash
# Verifies lens_fast on a CUDA GPU (H100/H200) within a fixed time budget (GPU_CHECK_BUDGET_S, default
# 420 s, build included), offline, writing results to OUT (default gpu_check/) after every step:
#   1. installs carried wheels (below), builds the extension in place (CUDA sources for this GPU only);
#   2. runs every `cuda`-marked test, the checks most likely to find a defect first:
#      reward_iou's last-arrival protocol against the C++ result over many repeated launches,
#      the CUDA RLE round trip, the fused decoder's outputs and gradients (under PyTorch's default
#      precision settings and with TF32 off), then every other CUDA test;
#   3. a few steps of the tiny trainer on the GPU (bf16-mixed, both stages);
#   4. the GPU benchmarks with short rounds, in whatever time is left.
# A step gets its own limit or the time left in the budget, whichever is less; a step reached with under
# 15 s left is recorded as not run. OUT holds four files at most (gpu_check.log, steps.tsv,
# gpu_check.json, benchmarks.json; JUnit XML goes to a scratch folder and is summarised in the JSON),
# so a device run returns all of them, and gpu_check.json is rewritten after each step: a run cut short
# still leaves the steps it finished.
# Usage: tools/gpu_check.sh [OUT] [--no-build]
#   --no-build  test the lens_fast already installed in this Python (no compiler needed).
# Wheels: a bare GPU machine lacks segment-anything and pycocotools (the fused decoder's and the RLE
# tests' references: without them those tests fail to collect). Download them here for the box's
# Python 3.12 x86-64 into .whl/ (ignored by git; ~0.5 MB) and carry that folder:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl segment-anything==1.0 pycocotools==2.0.11
# (their only dependency, numpy, and torchmetrics 1.9 are already there). The script installs every
# wheel in LENS_FAST_WHEELS (default .whl/) with pip --no-index --no-deps. With the device tool:
#   run(command="tools/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Without a GPU it still runs (a dry run): CUDA tests and benchmarks skip, the trainer step is left out.
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
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d)
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
rm -f "$OUT/gpu_check.json" "$OUT/benchmarks.json"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$(( start + BUDGET_S ))
NOT_RUN=-1  # steps.tsv's exit code of a step the budget left no time for

# step NAME LIMIT_S JUNIT COMMAND...: runs COMMAND for at most LIMIT_S or the budget left, logs it,
# records "name<TAB>exit code<TAB>seconds<TAB>JUnit XML file (- for none)" in steps.tsv.
step() {
  local name=$1 limit=$2 junit=$3
  shift 3
  local t0 rc left
  t0=$(date +%s)
  left=$(( deadline - t0 ))
  echo
  if (( left < 15 )); then
    echo "=== $name: not run, ${left}s left of the ${BUDGET_S}s budget"
    printf '%s\t%s\t0\t-\n' "$name" "$NOT_RUN" >> "$STEPS"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, at +$(( t0 - start ))s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$junit" >> "$STEPS"
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 ))s"
  return 0
}

# report: rewrites OUT/gpu_check.json from what the steps left so far.
report() {
  "$PYTHON" tools/gpu_check_report.py "$OUT" > /dev/null 2>&1 || true
}

echo "lens_fast GPU check, $(date -u +%FT%TZ), output in $OUT, budget ${BUDGET_S}s"
HAS_GPU=0
if nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null; then
  HAS_GPU=1
else
  echo "nvidia-smi: no GPU visible: a dry run (CUDA tests and benchmarks will be skipped)"
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step "install wheels from $WHEELS" 90 - "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl
else
  echo "no wheels in $WHEELS/: segment-anything and pycocotools are needed by the decoder and RLE tests (see the header)"
fi

if [ "$BUILD" = 1 ]; then
  if [ -z "${LENS_FAST_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
    [ -n "$cap" ] && export LENS_FAST_CUDA_ARCHS="${cap}-real"  # only this GPU's code: a faster build
  fi
  command -v nvcc > /dev/null && export LENS_FAST_CUDA=${LENS_FAST_CUDA:-1}  # nvcc present: CUDA sources required
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  step "build" 240 - "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e .
fi
"$PYTHON" -c "import torch, triton, transformers, lens_fast._C as C; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, transformers {transformers.__version__}, lens_fast._C with CUDA: {C.with_cuda}')"
report

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors)
# pytest_step STEP_NAME LIMIT_S JUNIT_NAME ARGS...: a pytest step writing SCRATCH/JUNIT_NAME.xml.
pytest_step() {
  local name=$1 limit=$2 junit="$SCRATCH/$3.xml"
  shift 3
  step "$name" "$limit" "$junit" "${PYTEST[@]}" "$@" --junitxml="$junit"
  report
}
FIRST=(tests/test_reward_iou.py tests/test_rle.py tests/test_nn_fuse_mask_decoder.py)
pytest_step "reward_iou last arrival vs C++" 90 junit-reward_iou -m cuda tests/test_reward_iou.py
pytest_step "CUDA RLE round trip" 60 junit-rle -m cuda tests/test_rle.py
pytest_step "fused decoder outputs and gradients" 120 junit-decoder -m cuda tests/test_nn_fuse_mask_decoder.py
pytest_step "other CUDA tests" 90 junit-other -m cuda tests "${FIRST[@]/#/--ignore=}"
if [ "$HAS_GPU" = 1 ]; then
  step "tiny trainer on the GPU (both stages)" 90 - "$PYTHON" -m lens_fast.train --device cuda --stage1-steps 4 \
    --stage2-steps 2 --val-size 8 --progress false --output-dir "$SCRATCH/train"
  report
fi
pytest_step "GPU benchmarks" 150 junit-bench bench -k cuda --benchmark-only --benchmark-min-rounds=3 \
  --benchmark-max-time=0.05 --benchmark-warmup=on --benchmark-warmup-iterations=1 \
  --benchmark-json="$OUT/benchmarks.json"

"$PYTHON" tools/gpu_check_report.py "$OUT"
rc=$?
rm -rf "$SCRATCH"
echo "total: $(( $(date +%s) - start ))s; log $LOG; figures $OUT/gpu_check.json"
exit $rc
