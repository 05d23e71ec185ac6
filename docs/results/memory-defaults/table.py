"""Markdown table of results.jsonl (run.py's runs): final validation loss per optimizer, rule and seed."""

import json
import statistics
from pathlib import Path

rows = [json.loads(line) for line in Path(__file__).with_name("results.jsonl").read_text().splitlines()]
print("| optimizer | max_factor_ratio | state / parameters | seeds | val loss per seed | mean | seconds (mean) |")
print("|---|---|---|---|---|---|---|")
for name in ("SPlus", "SOAP"):
    for ratio in (None, 20.0):
        runs = sorted((r for r in rows if r["optimizer"] == name and r["max_factor_ratio"] == ratio),
                      key=lambda r: r["seed"])
        if not runs:
            continue
        losses = [r["val_loss"] for r in runs]
        print(f"| {name} | {ratio} | {runs[0]['state_bytes'] / runs[0]['parameter_bytes']:.1f}x | "
              f"{','.join(str(r['seed']) for r in runs)} | {' / '.join(f'{x:.4f}' for x in losses)} | "
              f"{statistics.mean(losses):.4f} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
