"""Each whiten optimizer's step, eager against ``compiled=True`` (whiten.optim.kernels), on the same parameters and
fixed gradients: GPT shapes (benchmarks/gpu_step_time.py's ``gpt_shapes``), one group per role. Rounds alternate
the two so that drift hits both; the table gives medians and the ratio compiled / eager, measured in this run.

    python benchmarks/compiled_step_time.py [--device cpu] [--width 256] [--blocks 4] [--vocab 512] [--sync-free]

Optimizers that need a model's forward pass (K-FAC, EKFAC, K-BFGS) are left out: their step reads statistics from
hooks. Compilation happens in the warm-up steps, which are not timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import whiten  # noqa: E402
from gpu_step_time import gpt_shapes  # noqa: E402

NAMES = ["SPlus", "SOAP", "Shampoo", "PSGDKron", "Muon", "Scion", "SpecGD", "ScheduleFreeAdamW", "Sophia", "TNT",
         "Conda", "Prodigy", "MFAC"]
OPTIONS = {"MFAC": dict(ngrads=32)}
NEEDS_MODEL = ("KFAC", "EKFAC", "KBFGS")  # their step reads statistics from hooks on a model  # a window that fits a small machine's memory


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--names", default=",".join(NAMES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--sync-free", action="store_true", help="both with sync_free=True (where it exists)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = gpt_shapes(args.width, args.blocks, args.vocab)
    grads = [torch.randn(s, device=device) * 1e-3 for s, _ in shapes]
    print(f"# {device}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"threads {torch.get_num_threads()}; width {args.width}, {args.blocks} blocks, vocabulary {args.vocab}"
          + ("; sync_free=True where it exists" if args.sync_free else ""))
    print("| optimizer | eager ms/step | compiled=True ms/step | compiled / eager |")
    print("|---|---|---|---|")
    results = []
    for name in args.names.split(","):
        if name in NEEDS_MODEL:
            print(f"| {name} | needs a model's forward pass: not timed here | | |", flush=True)
            continue
        runs = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            params = [(torch.nn.Parameter(torch.randn(s, device=device) * 0.02), r) for s, r in shapes]
            groups: dict = {}
            for p, r in params:
                groups.setdefault(r, []).append(p)
            kw = dict(OPTIONS.get(name, {}))
            if args.sync_free and getattr(whiten, name).SYNC_FREE:
                kw["sync_free"] = True
            opt = getattr(whiten, name)([{"params": g, "role": r} for r, g in groups.items()], compiled=compiled,
                                        **kw)
            ps = [p for p, _ in params]
            for _ in range(3):  # warm-up: state, the first refresh, compilation
                for p, g in zip(ps, grads):
                    p.grad = g
                opt.step()
            runs[compiled] = (opt, ps, [])
        for _ in range(args.rounds):
            for compiled, (opt, ps, times) in runs.items():
                for p, g in zip(ps, grads):
                    p.grad = g
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                _sync(device)
                times.append((time.perf_counter() - t0) / args.steps * 1e3)
        eager, comp = (statistics.median(runs[c][2]) for c in (False, True))
        results.append({"optimizer": name, "eager_ms": eager, "compiled_ms": comp, "ratio": comp / eager})
        print(f"| {name} | {eager:.2f} | {comp:.2f} | {comp / eager:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                              "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
