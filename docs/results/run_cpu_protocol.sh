#!/usr/bin/env bash
# The cpu-profile protocol whose report is committed in docs/results/ (2-core machine, CPU build of torch 2.13.0).
# Each command is resumable: rerunning it skips finished runs. Runs go to results/cpu-protocol/.
set -euo pipefail
OUT=${OUT:-results/cpu-protocol}
STEPS=${STEPS:-500}

# lm: from init, 2 seeds, each optimizer over a 4-point slice of its x10^(1/3) grid around its default
whiten-bench sweep --task lm --optimizers adamw --lrs 0.001,0.00215,0.00464,0.01 --seeds 0,1 --steps "$STEPS" --out "$OUT" --no-plots
whiten-bench sweep --task lm --optimizers splus,pytorch_optimizer:SPlus --lrs 0.1,0.215,0.464,1.0 --seeds 0,1 --steps "$STEPS" --out "$OUT" --no-plots
# lm: from AdamW's weights after 500 steps (fresh optimizer state), seed 0
whiten-bench sweep --task lm --starts adamw@500 --optimizers adamw --lrs 0.001,0.00215,0.00464 --seeds 0 --steps "$STEPS" --out "$OUT" --no-plots
whiten-bench sweep --task lm --starts adamw@500 --optimizers splus --lrs 0.1,0.215,0.464 --seeds 0 --steps "$STEPS" --out "$OUT" --no-plots
# vit and dit: from init, seed 0
for task in vit dit; do
  whiten-bench sweep --task $task --optimizers adamw --lrs 0.001,0.00215,0.00464 --seeds 0 --steps "$STEPS" --out "$OUT" --no-plots
  whiten-bench sweep --task $task --optimizers splus --lrs 0.1,0.215,0.464 --seeds 0 --steps "$STEPS" --out "$OUT" --no-plots
done
whiten-bench report "$OUT"
