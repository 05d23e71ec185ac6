"""What the per-step finiteness checks (the gradients and the Adam-style second moments) cost in optimizer.step(),
before and after they were merged into one call with fused reductions.

    python benchmarks/moment_restart.py --device cpu --threads 1 [--width 256] [--rounds 15]
    python benchmarks/moment_restart.py --device cuda

SOAP, Muon (its AdamW part), Schedule-Free AdamW and Prodigy restart second-moment entries that a huge finite
gradient overflowed to inf (``WhitenOptimizer.restart_overflowed_moments``); without it the update would be zero
for good. Every step also checks the gradients (``finite_flags``: one reduction per tensor, one host sync). The
moments used to be checked in a second ``finite_flags`` call (a second host sync), each call one reduction kernel
per tensor; now they go into the gradients' call, which on an accelerator reduces the whole list with fused
kernels. On each optimizer's real state (GPT-shaped parameters of ``step_time.py``, fixed random gradients, after
one step), this times, interleaved: the step (with today's checks inside), the two old checks and today's one.
Medians; each check is timed between device syncs. The step time of "before" is about the step plus the difference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import whiten  # noqa: E402
from whiten.linalg import finite_flags  # noqa: E402
from step_time import gpt_params  # noqa: E402

OPTIMIZERS = {
    "SOAP": lambda ps: whiten.SOAP(ps, lr=3e-3),
    "Muon (+AdamW part)": lambda ps: whiten.Muon(ps, lr=0.02),
    "ScheduleFreeAdamW": lambda ps: whiten.ScheduleFreeAdamW(ps, lr=1e-3),
    "Prodigy": lambda ps: whiten.Prodigy(ps, lr=1.0),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5, help="steps per optimizer per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        params = gpt_params(args.width, args.blocks, 65, device, torch.float32)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(params)
        opt.step()  # state created, untimed
        grads = [p.grad for p in params]
        moments = [opt.state[p][opt.SECOND_MOMENT_KEY] for p in params if opt.SECOND_MOMENT_KEY in opt.state[p]]
        # before: the gradients and the moments in two calls, one reduction kernel per tensor (the old code);
        # now: one call, fused L1 norms on an accelerator (on a CPU both are per-tensor sums)
        checks = {"step": opt.step,
                  "before": lambda g=grads, m=moments: (finite_flags(g, fused=False), finite_flags(m, fused=False)),
                  "now": lambda g=grads, m=moments: finite_flags(g + m)}
        runs[name] = {k: (fn, []) for k, fn in checks.items()}
    for _ in range(args.rounds):
        for name, checks in runs.items():
            for fn, times in checks.values():
                for _ in range(args.steps):
                    sync(device)
                    t = time.perf_counter()
                    fn()
                    sync(device)
                    times.append(time.perf_counter() - t)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device {where}, torch {torch.__version__}, threads {torch.get_num_threads()}, width {args.width}, "
          f"blocks {args.blocks}, {args.rounds} rounds x {args.steps} calls (medians, ms)")
    print("| optimizer | checks before: 2 calls, per-tensor sums | checks now: 1 call | step before (est.) | "
          "step now | step time saved |")
    print("|---|---|---|---|---|---|")
    for name, checks in runs.items():
        ms = {k: statistics.median(times) * 1e3 for k, (_, times) in checks.items()}
        before = ms["step"] + ms["before"] - ms["now"]
        print(f"| {name} | {ms['before']:.3f} | {ms['now']:.3f} | {before:.3f} | {ms['step']:.3f} | "
              f"{1 - ms['step'] / before:.0%} |")


if __name__ == "__main__":
    main()
