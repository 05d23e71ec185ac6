"""Step times of the configurations the claim sweeps run (issue 14), to size them: the lm task's ``cpu`` profile at
its widths, each optimizer with its refresh cost separated out, and the cost of one evaluation.

    python benchmarks/claim_step_times.py --threads 2 [--steps 40] [--out times.json]

Each configuration trains ``--steps`` steps (after 3 untimed ones) with the refresh interval at ``--refresh`` (10):
the median step is the step without a refresh, and the time above ``steps x median`` divided by the refreshes is one
refresh, so the mean step at any interval r is ``median + refresh / r``; in wall time and in the process's CPU time
(steadier on a machine other jobs share: compare configurations by their CPU time relative to AdamW's). The text is random characters (84 distinct,
as Shakespeare's), so no data download is needed; the step time does not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from whiten.bench.registry import build_optimizer, get_spec, with_options  # noqa: E402
from whiten.bench.tasks import lr_factor, make_task  # noqa: E402


def time_config(task, name: str, refresh: int | None, steps: int) -> dict:
    spec = with_options(get_spec(name), refresh)
    model = task.build_model(0)
    opt = build_optimizer(spec, model, spec.default_lr, task.width, 300)
    base = [g["lr"] for g in opt.param_groups]
    walls, cpus = [], []
    for step in range(steps + 3):
        w0, c0 = time.perf_counter(), time.process_time()
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, 300, 15, "constant")
        loss = task.loss(model, task.train_batch(0, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 3:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    refreshes = steps // refresh if refresh else 0
    row = {"optimizer": name, "width": task.width, "refresh": refresh}
    for clock, times in (("wall", walls), ("cpu", cpus)):  # CPU time: less disturbed by other jobs
        median = statistics.median(times)
        row[f"{clock}_median_step"] = median
        row[f"{clock}_mean_step"] = sum(times) / steps
        row[f"{clock}_refresh"] = max(0.0, sum(times) - steps * median) / refreshes if refreshes else None
    row["utilization"] = sum(cpus) / sum(walls) / torch.get_num_threads()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--refresh", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 116)]
    text_path = Path("/tmp/claim-step-times.txt")
    text_path.write_text("".join(rng.choice(alphabet) for _ in range(400_000)))
    base = make_task("lm", "cpu", text_path=text_path)
    rows = []
    configs = [(name, args.refresh, 128) for name in ("splus", "shampoo", "shampoo-nograft", "soap")]
    configs += [(name, None, width) for width in (64, 128, 256) for name in ("adamw", "muon", "splus")]
    for name, refresh, width in configs:
        row = time_config(base.with_width(width), name, refresh, args.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for width in (64, 128, 256):
        task = base.with_width(width)
        model = task.build_model(0)
        task.evaluate(model)
        t0 = time.perf_counter()
        task.evaluate(model)
        rows.append({"evaluation": True, "width": width, "wall": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
