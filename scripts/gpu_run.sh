#!/usr/bin/env bash
# One call on the GPU machine: build against its torch, run the GPU tests, compute-sanitizer on a
# representative subset, then the benchmark; prints a short table last.
#   usage (device machine, repo root): bash scripts/gpu_run.sh [tests|sanitize|bench|all|mutant]...
# `mutant` (not part of `all`) checks that the programmatic-launch tests can fail at all: it runs
# tests/python/programmatic_chains.py against a second build whose kernels do not wait for the
# kernel before them, and reports each case's mismatches, in the chains and after the late
# producer (none would mean that part cannot tell that build from a correct one).
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
if want tests || want sanitize || want bench; then
  t0=$(date +%s)
  MODNORM_USE_SYSTEM_PYTHON=1 MODNORM_BUILD_DIR=build/gpu MODNORM_REQUIRE_GTEST=OFF \
    bash -c 'source scripts/env.sh' > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
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
if [[ " $STEPS " == *" mutant "* ]]; then
  cd "$ROOT"
  t0=$(date +%s)
  MUT=/tmp/modnorm-mutant
  rm -rf "$MUT" && mkdir -p "$MUT/src"
  git ls-files -z | xargs -0 cp --parents -t "$MUT/src"
  # The one wait every kernel calls (wait_for_prior_grid), removed.
  python3 - "$MUT/src/src/cuda/device_utils.cuh" <<'PY' || exit 1
import sys
path = sys.argv[1]
text = open(path).read()
wait = 'asm volatile("griddepcontrol.wait;\\n" ::: "memory");'
if text.count(wait) != 1:
    sys.exit("mutant: expected exactly one griddepcontrol.wait in " + path)
open(path, "w").write(text.replace(wait, "/* mutant: no wait */"))
PY
  (cd "$MUT/src" && python3 -m pip install -q --no-build-isolation --no-deps --target "$MUT/site" \
     -C build-dir="$MUT/build" -C cmake.define.MODNORM_TESTS=OFF -C cmake.define.MODNORM_ONNX=OFF \
     -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90a-real .) > "$OUT/mutant-build.log" 2>&1 \
    || { tail -30 "$OUT/mutant-build.log"; exit 1; }
  echo "mutant build: $(( $(date +%s) - t0 )) s"
  for pdl in 1 early; do
    env -u MODNORM_POISON_OUTPUTS MODNORM_PDL=$pdl PYTHONPATH="$MUT/site${PYTHONPATH:+:$PYTHONPATH}" \
      python3 tests/python/programmatic_chains.py > "$OUT/mutant-pdl-$pdl.json" 2> "$OUT/mutant-pdl-$pdl.err"
    rc=$?
    echo "mutant, MODNORM_PDL=$pdl: rc=$rc"
    if (( rc != 0 )); then tail -5 "$OUT/mutant-pdl-$pdl.err"; continue; fi
    python3 - "$OUT/mutant-pdl-$pdl.json" <<'PY'
import collections, json, sys
d = json.load(open(sys.argv[1]))
print(f"  seed {d.pop('seed')}")
for case, r in d.items():
    # Late-producer mismatches per "operation input" (an operation never caught stays visible).
    late = dict(collections.Counter(m.split(", ")[1] for m in r["late_mismatch"]))
    print(f"  {case:10s} chain {len(r['mismatch']):3d} mismatches  {r['mismatch'][:2]}; late producer {late}")
PY
  done
fi
