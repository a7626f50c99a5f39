#!/usr/bin/env bash
# Runs every test: the C++ core tests and example (ctest), then the PyTorch tests (pytest).
# GPU tests run where a CUDA GPU is present and are skipped elsewhere.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "[modnorm] ctest" >&2
ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2
echo "[modnorm] pytest" >&2
# tests import modnorm from the installed package, not the source tree
cd "$ROOT/tests/python"
"$PY" -m pytest -q -p no:cacheprovider "$@"
