"""Is ``rotation_dtype=torch.bfloat16`` faster? Step time of SPlus and SOAP with float32 and bfloat16 rotations on
the parameters of whiten-bench's lm model, interleaved in one process, with the matmul rates behind them.

    OMP_NUM_THREADS=1 python benchmarks/rotation_dtype.py --profile cpu --threads 1
    python benchmarks/rotation_dtype.py --profile gpu --device cuda --rounds 20

Three tables:
1. matmul: ms and GFLOP/s of one n×n×n product in float32 and bfloat16 (and TF32 on CUDA), interleaved, medians.
   Whether bfloat16 is native shows here: a CPU without AVX512-BF16/AMX converts and runs it far slower.
2. cast: the rotations of each same-shape stack of the model (SPlus's four matmuls) in bfloat16 with the bases
   cast to bfloat16 on every call (what whiten does) and with bases already in bfloat16 (what a cached copy would
   give): the share of the cast tells whether a cached copy would pay.
3. step: ms per optimizer.step() of SPlus (inverse_every 100) and SOAP (precondition_frequency 10), float32 vs
   bfloat16 rotations, registry settings otherwise. Each round times ``--steps`` consecutive steps of every
   configuration in turn (order rotating between rounds); the table shows the median over rounds of the mean step
   and the ratio bf16 / fp32 of those medians. With ``--steps 10`` every SOAP block holds one refresh; SPlus's
   refresh (every 100 steps, float32 in both) falls in one block in ten and the median leaves it out.
Gradients are fixed random tensors (seeded); parameters are those of ``build_model("lm", profile)`` with a
65-character vocabulary, grouped by ``whiten.param_groups``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

import whiten
from whiten.bench.models import PROFILES, build_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    found = sorted({w for w in flags.split() if w in ("avx512_bf16", "amx_bf16", "avx512f", "avx2")})
    return ",".join(found) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def matmul_table(sizes, device, rounds):
    configs = [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False)]
    if device.type == "cuda":
        configs.insert(1, ("tf32", torch.float32, True))
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        ops = {name: (a.to(dt), b.to(dt), tf32) for name, dt, tf32 in configs}
        repeat = max(1, int(2e8 // n**3)) if device.type == "cpu" else min(1000, max(10, int(4e11 // n**3)))
        times = {name: [] for name in ops}
        for r in range(rounds + 1):
            for name, (x, y, tf32) in ops.items():
                torch.backends.cuda.matmul.allow_tf32 = tf32
                t = timed(lambda: torch.mm(x, y), device, repeat)
                if r:  # the first round warms up
                    times[name].append(t)
        torch.backends.cuda.matmul.allow_tf32 = False
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append((n, med))
    names = [c[0] for c in configs]
    print("| n | " + " | ".join(f"{k} ms | {k} GFLOP/s" for k in names) + " | bf16 / fp32 time |")
    print("|---|" + "---|---|" * len(names) + "---|")
    for n, med in rows:
        cells = " | ".join(f"{med[k] * 1e3:.3f} | {2 * n**3 / med[k] / 1e9:.0f}" for k in names)
        print(f"| {n} | {cells} | {med['bf16'] / med['fp32']:.2f} |")


def model_groups(profile, device):
    model = build_model("lm", profile, vocab_size=65).to(device)
    return model, whiten.param_groups(model)


def cast_table(profile, device, rounds):
    model, groups = model_groups(profile, device)
    shapes: dict = {}
    for g in groups:
        for p in g["params"]:
            if p.ndim == 2:
                shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    print("| stack (count × m × n) | bf16, bases cast per call (ms) | bf16, bases already bf16 (ms) | cast share |")
    print("|---|---|---|---|")
    tot_cast = tot_pre = 0.0
    for (m, n), count in sorted(shapes.items()):
        M = torch.randn(count, m, n, device=device)
        QL = torch.linalg.qr(torch.randn(count, m, m, device=device)).Q
        QR = torch.linalg.qr(torch.randn(count, n, n, device=device)).Q
        QLb, QRb = QL.to(torch.bfloat16), QR.to(torch.bfloat16)

        def rot(ql, qr):
            X = torch.bmm(torch.bmm(ql.mT, M.to(torch.bfloat16)), qr).sign_()
            return torch.bmm(torch.bmm(ql, X), qr.mT).float()

        def cast():
            return rot(QL.to(torch.bfloat16), QR.to(torch.bfloat16))

        def pre():
            return rot(QLb, QRb)

        repeat = 1 if device.type == "cpu" else 20
        t = {"cast": [], "pre": []}
        for r in range(rounds + 1):
            for name, fn in (("cast", cast), ("pre", pre)) if r % 2 else (("pre", pre), ("cast", cast)):
                s = timed(fn, device, repeat)
                if r:
                    t[name].append(s)
        c, p = statistics.median(t["cast"]), statistics.median(t["pre"])
        tot_cast += c
        tot_pre += p
        print(f"| {count} × {m} × {n} | {c * 1e3:.3f} | {p * 1e3:.3f} | {(c - p) / c:+.1%} |")
    print(f"| all | {tot_cast * 1e3:.3f} | {tot_pre * 1e3:.3f} | {(tot_cast - tot_pre) / tot_cast:+.1%} |")


def make_optimizer(kind, groups, width):
    name, dtype = kind
    if name == "SPlus":  # the registry's splus entry
        return whiten.SPlus(groups, lr=0.1, nonstandard_constant=1 / width, inverse_every=100, rotation_dtype=dtype)
    return whiten.SOAP(groups, lr=2.15e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10,
                       rotation_dtype=dtype)


def step_table(profile, device, rounds, steps):
    width = PROFILES[profile]["lm"]["width"]
    kinds = [(n, d) for n in ("SPlus", "SOAP") for d in (None, torch.bfloat16)]
    opts = {}
    gen = torch.Generator().manual_seed(1)
    for kind in kinds:
        torch.manual_seed(0)
        model, groups = model_groups(profile, device)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
        opts[kind] = make_optimizer(kind, groups, width)
        for _ in range(2):  # state created, first refresh done
            opts[kind].step()
    times = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            times[kind].append(timed(opts[kind].step, device, steps))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lm {profile} profile: {n_params / 1e6:.2f} M parameters; {rounds} rounds × {steps} steps; medians\n")
    print("| optimizer | fp32 rotations ms/step | bf16 rotations ms/step | bf16 / fp32 | rounds' ratios min–max |")
    print("|---|---|---|---|---|")
    for name in ("SPlus", "SOAP"):
        a, b = times[(name, None)], times[(name, torch.bfloat16)]
        ratios = [y / x for x, y in zip(a, b)]
        print(f"| {name} | {statistics.median(a) * 1e3:.1f} | {statistics.median(b) * 1e3:.1f} | "
              f"{statistics.median(b) / statistics.median(a):.2f} | {min(ratios):.2f}–{max(ratios):.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu", choices=list(PROFILES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sizes", default="128,256,512")
    ap.add_argument("--tables", default="matmul,cast,step")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, flags {cpu_flags()}"
    print(f"# rotation_dtype: torch {torch.__version__}, {device} ({what}), {torch.get_num_threads()} threads, "
          f"load average {' '.join(load)} at start")
    try:
        print("# " + subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1]
              .splitlines()[0].strip())
    except (OSError, IndexError):
        pass
    tables = args.tables.split(",")
    if "matmul" in tables:
        print("\n## matmul\n")
        matmul_table([int(s) for s in args.sizes.split(",")], device, args.rounds)
    if "cast" in tables:
        print("\n## cast per step vs a bf16 copy of the bases (SPlus's four rotations per stack)\n")
        cast_table(args.profile, device, args.rounds)
    if "step" in tables:
        print("\n## step\n")
        step_table(args.profile, device, args.rounds, args.steps)


if __name__ == "__main__":
    main()
