#!/usr/bin/env bash
# One call on the GPU machine: build against its torch, run the GPU tests, compute-sanitizer on a
# representative subset, then the benchmark; prints a short table last.
#   usage (device machine, repo root): bash scripts/gpu_run.sh [tests|sanitize|bench|all]...
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/modnorm-out}"
mkdir -p "$OUT"
STEPS="${*:-all}"
want() { [[ " $STEPS " == *" all "* || " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16

if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
MODNORM_USE_SYSTEM_PYTHON=1 MODNORM_BUILD_DIR=build/gpu MODNORM_REQUIRE_GTEST=OFF \
  bash -c 'source scripts/env.sh' > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
cd "$ROOT/tests/python"

if want tests; then
  t0=$(date +%s)
  python3 -m pytest -q -m gpu -p no:cacheprovider ${MODNORM_PYTEST_ARGS:-} > "$OUT/pytest-gpu.log" 2>&1
  echo "gpu tests rc=$? ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/pytest-gpu.log")"
  grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest-gpu.log" | head -20
  # The C++ API's own GPU tests, where GoogleTest was found for the build.
  if [[ -x "$ROOT/build/gpu/modnorm_cuda_tests" ]]; then
    "$ROOT/build/gpu/modnorm_cuda_tests" --gtest_brief=1 > "$OUT/cuda-api-tests.log" 2>&1
    echo "C++ CUDA API tests rc=$?: $(grep -E '^\[  (PASSED|FAILED|SKIPPED)' "$OUT/cuda-api-tests.log" | tr '\n' ' ')"
  else
    echo "C++ CUDA API tests: not built here (no GoogleTest); build them with CMake where it is"
  fi
fi
if want sanitize; then
  SUBSET='test_accuracy.py::test_odd_sizes or test_accuracy.py::test_large_d or (test_matches_float64 and bfloat16 and llama and weight and shift and (per_sample or chunk or token_shared or per_token)) or test_repeated_backward or test_misaligned or (test_forward_row_tiles and weight_shift and (2048 or 3072)) or test_backward_long_rows_every_mode or test_backward_tile_ring or (test_forward_row_block_operand_sets and bfloat16 and (wsh or none)) or (test_forward_row_tile_operand_sets and bfloat16 and (wsh or none))'
  for tool in memcheck racecheck; do
    t0=$(date +%s)
    compute-sanitizer --tool $tool --error-exitcode 99 --target-processes all \
      python3 -m pytest -q -p no:cacheprovider -k "$SUBSET" -m "gpu and not slow" > "$OUT/sanitizer-$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$? ($(( $(date +%s) - t0 )) s): $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi
if want bench; then
  cd "$ROOT"
  python3 -m modnorm.bench --out "$OUT" ${MODNORM_BENCH_ARGS:-} > "$OUT/bench.log" 2> "$OUT/bench-progress.log"
  echo "bench rc=$?"
  tail -12 "$OUT/bench.log"
fi
