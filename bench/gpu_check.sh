#!/usr/bin/env bash
# One GPU check for the TensorRT path on a machine without TensorRT (bench/gpu_check.py):
# Triton gather/scatter kernels vs references, their bandwidth, routed vs dense prefill at
# Llama-3.1-8B layer shapes, and an engine where tensorrt imports. Under 8 minutes on one H200.
#   bench/gpu_check.sh              on a GPU machine: writes docs/results/gpu_check.{json,md}
#   bench/gpu_check.sh --dry-run    CPU, TRITON_INTERPRET=1, tiny shapes (checks the script)
# Runs from source: PYTHONPATH is the repository; PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  fi
done
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
