#!/usr/bin/env bash
# Issue 22's GPU table, as one prepared run on a lent GPU (the device tool runs it in the repository's root;
# $OUT comes back). The peers travel as wheels in .whl/ (see docs/performance.md, "GPU"):
#   python3 -m pip download --no-deps -d .whl heavyball==3.2.1 pytorch_optimizer==4.1.0 kron-torch==0.3.3 \
#       schedulefree==1.4.1 prodigyopt==1.1.2
# then, with the device tool: run(command="bash scripts/gpu_issue22.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
# first the syncs torch itself sees on an ordinary step (default, sync_free, sync_free + compiled), ~1 min; then
# the optimizer step at GPT-2-small shapes, at width 2048 (4 blocks), and the training step
timeout 70 python3 benchmarks/gpu_sync_check.py --out "$OUT/syncs.json" 2>&1 | tee "$OUT/syncs.md"
timeout 210 python3 benchmarks/gpu_step_time.py --parts step --out "$OUT/step-768.json" 2>&1 | tee "$OUT/step-768.md"
timeout 90 python3 benchmarks/gpu_step_time.py --parts step --width 2048 --blocks 4 \
    --algorithms splus,soap,muon,psgd-kron,schedule-free-adamw --out "$OUT/step-2048.json" 2>&1 | tee "$OUT/step-2048.md"
timeout 160 python3 benchmarks/gpu_step_time.py --parts train --out "$OUT/train.json" 2>&1 | tee "$OUT/train.md"
