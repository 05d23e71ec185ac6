"""Milliseconds per TRAINING step (forward, backward, the curvature's extra work, optimizer.step()) of the Fisher
family against AdamW and pytorch_optimizer's SophiaH, on the benchmark's GPT (whiten.bench.models.GPT).

    python benchmarks/fisher_step_time.py --width 128 --depth 2 --ctx 64 --batch 8 --rounds 5
    OMP_NUM_THREADS=1 python benchmarks/fisher_step_time.py --clock cpu ...   # on a CPU other jobs share
    python benchmarks/fisher_step_time.py --device cuda --width 768 --depth 12 --ctx 256 --batch 16

The curvature estimators differ, so the whole step is what is compared, not optimizer.step() alone:

- whiten.Sophia (SophiaG): every k = 10 steps one extra backward on labels sampled from the logits
  (``opt.sample_fisher(logits)``, Gauss–Newton–Bartlett), then an element-wise update.
- pytorch_optimizer.SophiaH: Hutchinson's estimator diag(H) ≈ z ⊙ (H z) every ``update_period`` = 10 steps, which
  needs ``loss.backward(create_graph=True)`` on those steps (a double backward through the whole graph) and a
  Hessian-vector product inside ``step()``; plain backward on the others. Fused attention kernels have no double
  backward, so SophiaH's Hessian steps run attention with the math kernel (its real cost). A different Hessian
  estimator (the true Hessian's diagonal, not the Gauss–Newton one), so only the cost is comparable here.
- whiten.TNT: every T1 = 10 steps the sampled backward and the factor contractions; inverses every T2 = 100 steps
  (every T1 during the first T2 steps); one tensordot per mode every step.
- whiten.KFAC / whiten.EKFAC (``model=`` hooks, the registry's alecwangcq settings): factors A and G every 10 steps
  from the hooks (empirical: the ordinary backward's output gradients; sampled: one extra backward on sampled
  labels), inversions (EKFAC: eigendecompositions) every 100 steps, EKFAC's eigenvalue rescaling every 10. The
  inversion falls in one round of ten: ``slowest step`` is the slowest step of all rounds.

Each round runs ``--period`` (10) steps for every optimizer in turn, so each round holds exactly one curvature
step per optimizer; the first round is warm-up and is not counted. The table shows the median over rounds of the
mean step of a round (the curvature step amortized), the median ordinary step and the curvature step alone.
TNT's first rounds also hold its early, more frequent inversions: ``--tnt-warm`` rounds are run before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import whiten
from whiten.bench.models import GPT

PERIOD = 10


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_steppers(model_factory, lr: float):
    """[(label, model, stepper(idx, targets, t) -> None)]; each optimizer trains its own copy of the model."""
    out = []

    def plain(label, opt_factory):
        model = model_factory()
        opt = opt_factory(model)

        def step(idx, targets, t):
            logits = model(idx)
            if hasattr(opt, "sample_fisher"):
                opt.sample_fisher(logits)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out.append((label, model, step))

    plain("torch.optim.AdamW", lambda m: torch.optim.AdamW(whiten.param_groups(m), lr=lr, betas=(0.9, 0.95),
                                                              weight_decay=0.1))
    plain("whiten.Sophia (k=10)", lambda m: whiten.Sophia(whiten.param_groups(m), lr=lr, k=PERIOD))
    kfac = dict(momentum=0.9, damping=1e-3, weight_decay=0.01, factor_every=PERIOD, inverse_every=10 * PERIOD)
    for name, extra in (("KFAC", {}), ("EKFAC", dict(scale_every=PERIOD))):
        for fisher in ("empirical", "sampled"):
            plain(f"whiten.{name} ({fisher})", lambda m, name=name, extra=extra, fisher=fisher: getattr(whiten, name)(
                whiten.param_groups(m), model=m, lr=lr, fisher=fisher, **kfac, **extra))
    plain("whiten.TNT (T1=10, T2=100)", lambda m: whiten.TNT(whiten.param_groups(m), lr=1e-6, update_freq=PERIOD,
                                                              inverse_freq=100))
    try:
        po = importlib.import_module("pytorch_optimizer")
    except ImportError:
        po = None
    if po is not None:
        model = model_factory()
        opt = po.SophiaH(whiten.param_groups(model), lr=lr, update_period=PERIOD, weight_decay=0.1)

        def sophia_h(idx, targets, t, model=model, opt=opt):
            # SophiaH estimates the Hessian on the steps where its counter hits update_period (the first, then every
            # 10th): those need the double backward, which the fused attention kernels do not have, so their
            # forward runs attention with the math kernel; the other steps are ordinary
            hessian_step = t % PERIOD == 0
            with sdpa_kernel(SDPBackend.MATH) if hessian_step else contextlib.nullcontext():
                loss = F.cross_entropy(model(idx).float().flatten(0, 1), targets.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward(create_graph=hessian_step)
            opt.step()

        out.append((f"pytorch_optimizer.SophiaH {getattr(po, '__version__', '')}".strip(), model, sophia_h))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tnt-warm", type=int, default=10, help="untimed TNT rounds (its first T2 = 100 steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (time.process_time), for a CPU shared with other jobs; "
                         "with one thread it is the work done, whatever else runs")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    device = torch.device(args.device)

    def model_factory():
        torch.manual_seed(0)
        return GPT(args.vocab, args.ctx, args.width, args.depth, args.heads).to(device)

    steppers = make_steppers(model_factory, args.lr)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.ctx + 1), generator=g).to(device)
               for _ in range(PERIOD)]
    times: dict = {label: [] for label, _, _ in steppers}
    step_counter = {label: 0 for label, _, _ in steppers}

    def one_round(label, stepper, record):
        per_step = []
        for b in batches:
            _sync(device)
            t0 = clock()
            stepper(b[:, :-1], b[:, 1:], step_counter[label])
            _sync(device)
            per_step.append(clock() - t0)
            step_counter[label] += 1
        if record:
            times[label].append(per_step)

    for label, _, stepper in steppers:  # warm-up round (and TNT's early inversions)
        for _ in range(args.tnt_warm if label.startswith("whiten.TNT") else 1):
            one_round(label, stepper, record=False)
    for _ in range(args.rounds):
        for label, _, stepper in steppers:
            one_round(label, stepper, record=True)

    n_params = sum(p.numel() for p in steppers[0][1].parameters())
    print(f"GPT width {args.width}, depth {args.depth}, ctx {args.ctx}, batch {args.batch}, vocab {args.vocab} "
          f"({n_params / 1e6:.2f} M parameters), {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}; {args.rounds} rounds x {PERIOD} steps, "
          f"{args.clock} clock")
    base = statistics.median(statistics.mean(r) for r in times[steppers[0][0]])
    print("| optimizer | ms/step (curvature amortized) | ordinary step ms | curvature step ms | slowest step ms "
          "| vs AdamW |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in steppers:
        rounds = times[label]
        mean = statistics.median(statistics.mean(r) for r in rounds)
        # the curvature step is the round's slowest (the sampled or double backward; TNT's also contracts)
        ordinary = statistics.median(x for r in rounds for x in sorted(r)[:-1])
        curvature = statistics.median(max(r) for r in rounds)
        curv = "-" if label.startswith("torch.optim.AdamW") else f"{curvature * 1e3:.1f}"
        # K-FAC's inversions (every 100 steps) fall in one round of ten: the slowest step of all rounds
        slowest = max(x for r in rounds for x in r)
        print(f"| {label} | {mean * 1e3:.1f} | {ordinary * 1e3:.1f} | {curv} | {slowest * 1e3:.1f} | "
              f"{mean / base:.2f}x |")


if __name__ == "__main__":
    main()
