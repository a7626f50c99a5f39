# Sourced by the other scripts: a Python environment with modnorm built and installed.
#
# By default a virtual environment in .venv with the pinned requirements (a fresh machine needs
# nothing else). MODNORM_USE_SYSTEM_PYTHON=1 uses the python3 on PATH as it is (the GPU machines,
# which have torch and no network).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ "${MODNORM_USE_SYSTEM_PYTHON:-0}" == "1" ]]; then
  PY=python3
else
  if [[ ! -x .venv/bin/python ]]; then
    # torch with its CUDA libraries takes ~6 GB installed, plus the downloads: a full disk
    # otherwise shows up only as pip's "No space left on device".
    free_gib=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
    if (( free_gib < 12 )); then
      echo "[modnorm] warning: ${free_gib} GiB free here; the pinned environment needs about 12 GiB" >&2
    fi
    echo "[modnorm] creating .venv" >&2
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  echo "[modnorm] installing pinned requirements (requirements/ci.txt)" >&2
  "$PY" -m pip install -q -r requirements/ci.txt
  export PATH="$ROOT/.venv/bin:$PATH"
fi
# modnorm-onnx needs protoc and libprotobuf (Debian's packages); install them where we may.
if ! command -v protoc >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
  echo "[modnorm] installing protobuf-compiler libprotobuf-dev" >&2
  (apt-get install -y -q protobuf-compiler libprotobuf-dev >/dev/null 2>&1 ||
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q protobuf-compiler libprotobuf-dev >/dev/null 2>&1)) ||
    echo "[modnorm] could not install protobuf; modnorm-onnx will not be built" >&2
fi
# With the pinned environment the ONNX tool is required (a missing prerequisite fails the build);
# elsewhere it is built when its prerequisites are there.
if [[ "${MODNORM_USE_SYSTEM_PYTHON:-0}" == "1" ]]; then
  : "${MODNORM_ONNX:=AUTO}"
else
  : "${MODNORM_ONNX:=ON}"
fi
# One CMake build: the core (with CUDA when nvcc is found), the C++ tests and example, and the
# PyTorch extension, installed into the environment.
BUILD_DIR="${MODNORM_BUILD_DIR:-build/py}"
echo "[modnorm] building and installing modnorm (build dir $BUILD_DIR)" >&2
"$PY" -m pip install -q --no-build-isolation --no-deps \
  -C build-dir="$BUILD_DIR" -C cmake.define.MODNORM_TESTS=ON -C cmake.define.MODNORM_REQUIRE_GTEST=${MODNORM_REQUIRE_GTEST:-ON} \
  -C cmake.define.MODNORM_ONNX=$MODNORM_ONNX \
  ${MODNORM_PIP_ARGS:-} .
