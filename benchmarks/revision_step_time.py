"""One-process step time of whiten's optimizers in two source trees, interleaved in one run, to tell a regression
from noise.

    git worktree add /tmp/whiten-before <rev>
    python benchmarks/revision_step_time.py /tmp/whiten-before/src src --rounds 5

Each round runs every optimizer once per tree, in a fresh subprocess with that tree first on the path, and the
order of the trees alternates between rounds. Shapes: a GPT-like stack of ``--blocks`` blocks of width ``--width``
(q, k, v, o, fc1, fc2 and two norm gains each) with an embedding and a head of 65 rows; gradients are seeded and
the same in both trees; a round times one refresh period (SPlus inverse_every, SOAP and Shampoo
precondition_frequency = ``--period``; PSGD-Kron updates its factors every step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

NAMES = ["SPlus", "SOAP", "Shampoo", "PSGDKron", "Muon", "ScheduleFreeAdamW"]


def child(name: str, width: int, blocks: int, period: int, threads: int, grouped: bool = False) -> None:
    import torch

    import whiten

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = [(65, width)] + [s for _ in range(blocks) for s in
                               [(width, width)] * 4 + [(4 * width, width), (width, 4 * width), (width,), (width,)]]
    shapes += [(65, width)]
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    roles = ["embedding"] + [("hidden" if len(s) == 2 else "vector") for s in shapes[1:-1]] + ["head"]
    if grouped:  # one group per role, as whiten.param_groups makes them
        by_role: dict = {}
        for p, r in zip(params, roles):
            by_role.setdefault(r, []).append(p)
        groups = [{"params": ps, "role": r} for r, ps in by_role.items()]
    else:  # a group per parameter
        groups = [{"params": [p], "role": r} for p, r in zip(params, roles)]
    kw = {"SPlus": dict(inverse_every=period), "SOAP": dict(precondition_frequency=period),
          "Shampoo": dict(precondition_frequency=period), "PSGDKron": dict(preconditioner_update_probability=1.0),
          }.get(name, {})  # the others (SpecGD, Scion, Conda, Prodigy, Sophia, TNT) with their defaults
    opt = getattr(whiten, name)(groups, **kw)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(2):  # warm-up: state created, first refresh done
        opt.step()
    t0 = time.perf_counter()
    for _ in range(period):
        opt.step()
    print(json.dumps({"ms": (time.perf_counter() - t0) / period * 1e3, "file": whiten.__file__}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="the src/ folder of the earlier tree")
    ap.add_argument("after", help="the src/ folder of the later tree")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--period", type=int, default=10)
    ap.add_argument("--optimizers", default=",".join(NAMES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1: steadier on a "
                                                            "shared machine)")
    ap.add_argument("--grouped", action="store_true", help="one param group per role (whiten.param_groups' "
                                                          "layout) instead of a group per parameter")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.width, args.blocks, args.period, args.threads, args.grouped)
        return
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    times: dict = {(n, t): [] for n in args.optimizers.split(",") for t in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in args.optimizers.split(","):
            for tree in order:
                env = {**os.environ, "PYTHONPATH": trees[tree]}
                out = subprocess.run([sys.executable, __file__, "x", "y", "--child", name, "--width", str(args.width),
                                      "--blocks", str(args.blocks), "--period", str(args.period),
                                      "--threads", str(args.threads)] + (["--grouped"] if args.grouped else []),
                                     env=env, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                assert res["file"].startswith(trees[tree]), (res["file"], trees[tree])
                times[(name, tree)].append(res["ms"])
    print(f"width {args.width}, {args.blocks} blocks, {args.rounds} interleaved rounds, {args.threads} thread(s), "
          f"{'a group per role' if args.grouped else 'a group per parameter'}, median ms/step over a refresh period "
          f"of {args.period}\n")
    print("| optimizer | before | after | after / before |")
    print("|---|---|---|---|")
    for name in args.optimizers.split(","):
        b, a = statistics.median(times[(name, "before")]), statistics.median(times[(name, "after")])
        print(f"| {name} | {b:.1f} | {a:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
