#!/usr/bin/env bash
# The device check of rotation_dtype (docs/performance.md): step time and matmul rates on a GPU, then the lm loss
# with fp32 and bf16 rotations (4 seeds each, 500 steps, the cpu profile's model). Run from a folder holding src/,
# benchmarks/rotation_dtype.py and data/shakespeare.txt; writes under $OUT (default ./gpu-out). Each part has its
# own time limit, so a slow part cannot take the others with it.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; nproc
  python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/gpu.txt" 2>&1
B="python3 benchmarks/rotation_dtype.py --device cuda"
timeout 100 $B --profile gpu --rounds 20 --steps 10 --tables step > "$OUT/step-gpu.md" 2>&1
timeout 60 $B --profile cpu --rounds 20 --steps 10 --tables step > "$OUT/step-cpu.md" 2>&1
timeout 60 $B --profile gpu --rounds 20 --sizes 128,256,512,768,1024,3072 --tables matmul,cast > "$OUT/matmul.md" 2>&1
cat "$OUT/gpu.txt" "$OUT"/*.md
S="python3 -m whiten.bench sweep --task lm --profile cpu --steps 500 --device cuda --text data/shakespeare.txt"
S="$S --no-plots --seeds ${SEEDS:-0,1,2,3}"
timeout "${LOSS_S:-200}" $S --optimizers splus,splus-bf16 --lrs 0.1 --out "$OUT/loss-splus" > "$OUT/loss-splus.log" 2>&1 &
timeout "${LOSS_S:-200}" $S --optimizers soap,soap-bf16 --lrs 0.00215 --out "$OUT/loss-soap" > "$OUT/loss-soap.log" 2>&1 &
wait
python3 - "$OUT" <<'PY' | tee "$OUT/loss.txt"
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).rglob("done.json")):
    s = json.loads(f.read_text())
    print(f.parent.relative_to(sys.argv[1]), s["final_val_loss"], round(s["seconds_per_step"], 4))
PY
tail -n 3 "$OUT"/loss-*.log
tar czf "$OUT/loss.tgz" -C "$OUT" loss-splus loss-soap loss-splus.log loss-soap.log 2>/dev/null
rm -rf "$OUT/loss-splus" "$OUT/loss-soap" "$OUT"/loss-*.log
