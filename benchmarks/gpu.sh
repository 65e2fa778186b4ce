#!/usr/bin/env bash
# The GPU check (issues 15 item 8, 17 item 4): runs benchmarks/gpu.py, log and JSON to $OUT
# (./gpu_out where $OUT is unset). Extra arguments go to gpu.py (e.g. --dry-run on a CPU machine).
# On the GPU machine, install the carried wheels first (benchmarks/gpu_wheels.txt):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
out="${OUT:-$PWD/gpu_out}"
mkdir -p "$out" || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu_log.txt"
