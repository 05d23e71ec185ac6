"""Milliseconds per optimizer.step() on a GPT-shaped parameter set, against AdamW and other PyTorch SPlus
implementations, with the 6-matmul floor of the algorithm measured in the same run.

    python benchmarks/step_time.py --width 256 --blocks 4
    python benchmarks/step_time.py --width 768 --blocks 4 --rounds 5

Every optimizer gets the same parameters and fixed random gradients. Runs are interleaved (round-robin over the
optimizers, `--steps` steps each per round) and each step is timed alone; the table shows the median.
`refresh ms` is the extra time of a step that refreshes the eigenbasis (measured as the median step of a second
instance that refreshes at every step, minus the median ordinary step); `amortized` adds a hundredth of it, since
the basis is refreshed every `inverse_every` = 100 steps. The floor is the time of exactly the six matmuls SPlus needs per
matrix (G Gᵀ, Gᵀ G and the four rotations, 6·(m²n + mn²) FLOPs) run back to back with torch.mm on the same shapes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import whiten


def gpt_params(width: int, blocks: int, vocab: int, device, dtype) -> list[nn.Parameter]:
    shapes = []
    for _ in range(blocks):
        shapes += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width), (width,), (width,)]
    shapes.append((width,))
    if vocab:
        shapes += [(vocab, width), (vocab, width)]
    return [nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]


OFFICIAL = None


def make_optimizers(names, params_for, every=100):
    """name -> (optimizer, params). Each optimizer owns a separate copy of the parameters."""
    out = {}
    for name in names:
        params = params_for()
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
        elif name == "whiten":
            opt = whiten.SPlus(params, lr=0.1, inverse_every=every)
        elif name == "pytorch_optimizer":
            from pytorch_optimizer import SPlus as PoSPlus

            opt = PoSPlus(params, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, inverse_steps=every)
        elif name == "official":
            # kvfrans/splus torch/splus.py, loaded from --official PATH (not shipped with whiten). Its defaults
            # differ (b2 0.999, wd 1e-2): set to the paper's values so the work per step is the same.
            opt = OFFICIAL(params, lr=0.1, b1=0.9, b2=0.95, weight_decay=0.1, inverse_every=every)
        else:
            raise ValueError(f"unknown optimizer {name!r}")
        out[name] = (opt, params)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(opt, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def matmul_floor(params, device, dtype, repeats: int) -> tuple[float, float]:
    """(seconds for the six matmuls of every matrix, FLOPs)."""
    mats = [p for p in params if p.ndim == 2]
    flops = sum(6 * (m * m * n + m * n * n) for m, n in (p.shape for p in mats))
    inputs = []
    for p in mats:
        m, n = p.shape
        g = torch.randn(m, n, device=device, dtype=dtype)
        inputs.append((g, torch.randn(m, m, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)))

    def run():
        for g, ql, qr in inputs:
            torch.mm(g, g.T)
            torch.mm(g.T, g)
            x = torch.mm(torch.mm(ql.T, g), qr)
            torch.mm(torch.mm(ql, x), qr.T)

    run()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), flops


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, (list, tuple)):
                total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=0, help="add an embedding and a head of this vocabulary")
    ap.add_argument("--optimizers", default="adamw,whiten,pytorch_optimizer")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per optimizer per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--official", default=None,
                    help="path to the official torch/splus.py of kvfrans/splus: adds it as optimizer 'official'")
    args = ap.parse_args(argv)
    if args.official:
        import importlib.util

        spec = importlib.util.spec_from_file_location("official_splus", args.official)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        global OFFICIAL
        OFFICIAL = module.SPlus
        if "official" not in args.optimizers:
            args.optimizers += ",official"
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    template = gpt_params(args.width, args.blocks, args.vocab, device, dtype)
    grads = [torch.randn_like(p) for p in template]

    def params_for():
        ps = [nn.Parameter(p.detach().clone()) for p in template]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps

    names = args.optimizers.split(",")
    opts = make_optimizers(names, params_for)
    n_params = sum(p.numel() for p in template)
    param_bytes = sum(p.numel() * p.element_size() for p in template)

    # Warm-up: step 1 (which refreshes the basis) and a few more.
    for opt, _ in opts.values():
        for _ in range(3):
            opt.step()
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, (opt, _) in opts.items():
            for _ in range(args.steps):
                times[name].append(timed_step(opt, device))
    # The refresh cost: the same optimizer refreshing at every step, minus the median ordinary step.
    refreshing = make_optimizers([n for n in names if n != "adamw"], params_for, every=1)
    refresh_times = {name: [] for name in refreshing}
    for _ in range(max(3, args.rounds // 2)):
        for name, (opt, _) in refreshing.items():
            refresh_times[name].append(timed_step(opt, device))
    del refreshing
    refresh = {name: statistics.median(ts[1:] if len(ts) > 1 else ts) - statistics.median(times[name])
               for name, ts in refresh_times.items()}
    floor_s, flops = matmul_floor(template, device, dtype, repeats=max(5, args.rounds))

    print(f"# step time: {args.blocks} blocks of width {args.width}"
          f"{f', vocab {args.vocab}' if args.vocab else ''}; {n_params / 1e6:.2f} M params, {args.dtype}, "
          f"{device}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# {args.rounds} interleaved rounds x {args.steps} steps; medians\n")
    print("| optimizer | median ms/step | refresh ms (every 100 steps) | amortized ms/step | vs AdamW | vs floor | state / params |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(times["adamw"]) if "adamw" in times else None
    for name in names:
        med = statistics.median(times[name]) * 1e3
        extra = refresh.get(name, 0.0) * 1e3
        amort = med + extra / 100
        ratio = f"{med / (base * 1e3):.2f}x" if base else "-"
        fl = f"{med / (floor_s * 1e3):.2f}x" if name != "adamw" else "-"
        mem = state_bytes(opts[name][0]) / param_bytes
        print(f"| {name} | {med:.1f} | {extra:.0f} | {amort:.1f} | {ratio} | {fl} | {mem:.2f}x |")
    print(f"| 6-matmul floor | {floor_s * 1e3:.1f} | | | | 1.00x | |")
    print(f"\nfloor: {flops / 1e9:.2f} GFLOP per step at {flops / floor_s / 1e9:.0f} GFLOP/s measured on the same shapes")


if __name__ == "__main__":
    main()
