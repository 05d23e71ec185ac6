"""Steps to AdamW's loss with every optimizer at the registry's setting and AdamW at its registry lr: the comparison
before tuning, from the tune's own start-point runs (each tune runs its start point on both seeds).

    python docs/results/fair-tuning/untuned.py docs/results/fair-tuning 250steps
"""

import json
import sys
from pathlib import Path

from whiten.bench.metrics import speedup_test
from whiten.bench.registry import get_spec
from whiten.bench.report import CLOCKS, tuned_fractions


def runs(root: Path, name: str) -> list[dict]:
    lr = get_spec(name).default_lr
    return [json.loads(p.read_text()) for seed in (0, 1)
            if (p := root / name / f"lr{lr:g}-seed{seed}" / "done.json").exists()]


def main():
    root = Path(sys.argv[1]) / sys.argv[2] / "lm" / "cpu" / "init"
    base = runs(root, "adamw")
    print(f"AdamW at its registry lr: final val loss {[round(r['final_val_loss'], 3) for r in base]}")
    print("| optimizer (registry setting) | final val loss per seed | steps to AdamW | significant? |")
    print("|---|---|---|---|")
    for name in ("muon", "soap", "psgd-kron", "splus", "sophia"):
        mine = runs(root, name)
        if len(mine) < 2 or len(base) < 2:
            continue
        steps, _ = tuned_fractions(base, mine, CLOCKS["wall"])
        test = speedup_test(steps)
        losses = " / ".join(f"{r['final_val_loss']:.3f}" for r in mine)
        print(f"| {name} | {losses} | {test['mean']:.2f} | "
              f"{'yes' if test['significant'] else 'no'} |")


if __name__ == "__main__":
    main()
