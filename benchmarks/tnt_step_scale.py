"""How large is TNT's step against its momentum, and why is its lr so far below other optimizers'?

TNT steps ``lr * Delta`` with ``Delta = m x_1 Inv_1 ... x_k Inv_k``, ``Inv_i = (U~_i + eps I)^-1``. Every inverse has
eigenvalues in (0, 1/eps], so ``|Delta| <= eps^-k |m|``, with equality where the factors' mean eigenvalue
c = (tr U / prod n)^(1/k) is far below eps. This trains the benchmark's task as ``whiten-bench sweep`` does (the
registry's TNT settings, 5% linear warm-up then a constant lr, sample_fisher on the steps TNT asks for it) and
prints, for every parameter with curvature, c and |Delta|/|m| against the bound eps^-k.

    OMP_NUM_THREADS=1 python benchmarks/tnt_step_scale.py --task lm --steps 201 --lr 1e-6
    OMP_NUM_THREADS=1 python benchmarks/tnt_step_scale.py --task vit --steps 201 --lr 1e-6

201 steps: TNT inverts every T1 = 10 steps during its first T2 = 100, then every 100, so the printed state holds
the inverses of step 200 (the run's horizon, for the warm-up, is ``--horizon`` = 500 steps, the sweep's).
"""

from __future__ import annotations

import argparse
import math
import platform

import torch

from whiten.bench.registry import build_optimizer, get_spec
from whiten.bench.tasks import lr_factor, make_task
from whiten.optim.tnt import _layout, precondition


def train(task, opt, model, steps: int, horizon: int, seed: int) -> float:
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, int(0.05 * horizon))
    loss = math.nan
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, horizon, warmup, "constant")
        batch = task.train_batch(seed, step)
        if opt.fisher_due():
            out, output = task.loss_and_output(model, batch)
            opt.sample_fisher(output, kind=task.fisher_kind)
        else:
            out = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        loss = out.item()
    return loss


def scale_rows(opt) -> list[tuple]:
    """(shape, k, c, |Delta|/|m|, eps^-k) for every parameter that has curvature."""
    rows = []
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p)
            if not s or s["captures"] == 0:
                continue
            lay = _layout(p, group)
            k = len(lay.modes)
            c = float((s["trace"] / math.prod(lay.modes)) ** (1.0 / k))
            m = s["momentum"]
            inverses = [s.get(f"inverse_{i}") for i in range(k)]
            delta = precondition(m.reshape(lay.modes), inverses, s["inverse_scale"])
            rows.append((tuple(p.shape), k, c, float(delta.norm() / m.norm()), group["damping"] ** -k))
    return sorted(rows, key=lambda r: (r[1], r[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["lm", "vit"], default="lm")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=201)
    ap.add_argument("--horizon", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    task = make_task(args.task, args.profile, "cpu")
    model = task.build_model(args.seed)
    opt = build_optimizer(get_spec("tnt"), model, args.lr, task.width)
    loss = train(task, opt, model, args.steps, args.horizon, args.seed)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}; task {args.task} "
          f"({args.profile}), TNT lr {args.lr:g}, {args.steps} steps, last training loss {loss:.3f}")
    print("| shape | modes k | c | abs(Delta)/abs(m) | bound eps^-k |")
    print("|---|---|---|---|---|")
    for shape, k, c, ratio, bound in scale_rows(opt):
        print(f"| {shape} | {k} | {c:.2g} | {ratio:.3g} | {bound:.0e} |")


if __name__ == "__main__":
    main()
