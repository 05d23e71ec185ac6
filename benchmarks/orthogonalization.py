"""How close each Newton–Schulz schedule gets to the polar factor U Vᵀ, per iteration count.

    OMP_NUM_THREADS=1 python benchmarks/orthogonalization.py --out docs/orthogonalization.md

For every shape, spectrum and dtype, a float64 matrix G is built, its polar factor U Vᵀ computed by a float64 SVD,
and whiten.linalg.newton_schulz run on G (cast to the dtype) for each iteration count and schedule. The error is the
RMS over singular directions, ‖NS_k(G) − U Vᵀ‖_F / √min(m, n), computed in float64 (for a full-rank G in exact
arithmetic this is the RMS over singular values of |p(σ_i) − 1|, p the composed polynomial). Spectra: singular
values log-spaced from 1 to 1/cond ("cond 10", "cond 1e3"), and a Gaussian matrix (entries N(0, 1): square ones
have a few tiny singular values). The result does not depend on the scale of G (it is normalized first).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import time

import torch

from whiten import linalg

SCHEDULES = ("jordan", "polar_express", "cubic")
ITERATIONS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30)
MARKER = "<!-- below: written by benchmarks/orthogonalization.py -->"


def spectrum_matrix(m: int, n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    cond = float(kind.split()[-1])
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (U * torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)) @ V.T


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(shapes, spectra, dtypes, device) -> list[tuple]:
    rows = []
    for (m, n) in shapes:
        for kind in spectra:
            G = spectrum_matrix(m, n, kind)
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            P = U @ Vh
            smin = (S.min() / S.max()).item()
            for dtype in dtypes:
                X = G.to(device=device, dtype=dtype).unsqueeze(0)
                for name in SCHEDULES:
                    errs = []
                    for k in ITERATIONS:
                        out = linalg.newton_schulz(X, k, name).double().cpu()[0]
                        errs.append(((out - P).norm() / math.sqrt(min(m, n))).item())
                    rows.append((f"{m}x{n}", kind, f"{smin:.1e}", str(dtype).replace("torch.", ""), name, errs))
    return rows


def table(rows) -> str:
    head = "| shape | spectrum | σ_min/σ_max | dtype | schedule | " + " | ".join(f"k={k}" for k in ITERATIONS) + " |"
    lines = [head, "|" + "---|" * (5 + len(ITERATIONS))]
    for shape, kind, smin, dtype, name, errs in rows:
        cells = [f"{e:.1e}" for e in errs]
        lines.append(f"| {shape} | {kind} | {smin} | {dtype} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="128x128,128x512")
    ap.add_argument("--spectra", default="cond 10,cond 1e3,gaussian")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the markdown section there (else print it)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    spectra = args.spectra.split(",")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    t0 = time.perf_counter()
    rows = measure(shapes, spectra, dtypes, args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    text = (f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/orthogonalization.py "
            f"--shapes {args.shapes} --spectra '{args.spectra}' --dtypes {args.dtypes} --device {args.device}`  \n"
            f"Machine: {device}; torch {torch.__version__}; whiten at {git_revision()}; "
            f"{time.perf_counter() - t0:.0f} s.\n\n"
            "RMS error ‖NS_k(G) − U Vᵀ‖_F / √min(m, n) after k iterations:\n\n" + table(rows) + "\n")
    if args.out:  # keep the page's text above the marker, replace what the last run wrote below it
        try:
            page = open(args.out).read()
        except FileNotFoundError:
            page = ""
        head = page.split(MARKER)[0] if MARKER in page else page
        with open(args.out, "w") as f:
            f.write(head + MARKER + "\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
