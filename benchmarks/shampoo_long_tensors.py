"""Shampoo's state and step time on long and tall tensors: Distributed Shampoo's blocking (max_factor_ratio=None)
against whiten's default (max_factor_ratio=20), the shapes of issue 11. Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/shampoo_long_tensors.py [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import whiten


def measure(shape, ratio, steps):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = whiten.Shampoo([p], max_factor_ratio=ratio)  # defaults otherwise: refresh every step, Adam grafting
    times = []
    for _ in range(steps):
        p.grad = torch.randn(shape)
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    return state / 2**20, p.numel() * p.element_size() / 2**20, statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.steps} steps")
    print("| shape | blocking | parameter MiB | state MiB | state / parameter | s/step |")
    print("|---|---|---|---|---|---|")
    for shape in [(50000,), (50000, 64), (64, 64, 3, 3), (512, 128), (32, 32)]:
        for ratio in (None, 20.0):
            state, param, t = measure(shape, ratio, args.steps)
            name = "DS (None)" if ratio is None else f"ratio {ratio:g}"
            print(f"| {shape} | {name} | {param:.2f} | {state:.1f} | {state / param:.1f} | {t:.3f} |", flush=True)


if __name__ == "__main__":
    main()
