#!/usr/bin/env bash
# The main job: benchmark modnorm against the unfused PyTorch code (and, on a GPU, torch.compile
# and Liger-Kernel when installed) on whatever device is present; prints the table and writes it
# to docs/.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m modnorm.bench --out "$ROOT/docs" "$@"
