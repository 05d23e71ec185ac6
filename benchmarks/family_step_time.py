"""Milliseconds per optimizer.step() of whiten's Shampoo-family and baseline optimizers against the PyTorch
implementations users would otherwise pick, at the same settings, on a GPT-shaped parameter set.

    python benchmarks/family_step_time.py --width 256 --blocks 4
    python benchmarks/family_step_time.py --width 256 --blocks 4 --algorithms soap,muon --rounds 5
    python benchmarks/family_step_time.py --width 256 --blocks 4 --algorithms conda,prodigy,mfac --rounds 5
    OMP_NUM_THREADS=1 python benchmarks/family_step_time.py --algorithms muon,scion,specgd --threads 1

For each algorithm every implementation gets a copy of the same parameters and fixed random gradients; runs are
interleaved (round-robin over all implementations) and each round runs one full refresh period (`--period` steps,
so a basis/root refresh happens once per round at frequency `--period`). The table shows the median step (an
ordinary step) and the mean step (refreshes amortized), each over all rounds, and the ratio to torch.optim.AdamW
measured in the same rounds. Peers that are not installed are listed as such. heavyball compiles its steps with
torch.compile by default; `--heavyball-compile` keeps that (compile time is excluded by the warm-up), otherwise it
runs eagerly.

PSGD-Kron runs with preconditioner_update_probability=1, the first 500 steps of its default schedule (and all of the
benchmark's 500-step runs); `--psgd-probability 0.03` times the schedule's floor, where long runs spend most steps.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time

import torch
from torch import nn

import whiten

FREQ = 10
MFAC_NGRADS = 32  # the window is ngrads x the parameters: 32 x 3.15 M floats = 0.4 GB at the default shapes


def gpt_params(width: int, blocks: int) -> list[tuple[tuple[int, ...], str]]:
    shapes = []
    for _ in range(blocks):
        shapes += [((width, width), "hidden")] * 4 + [((4 * width, width), "hidden"), ((width, 4 * width), "hidden"),
                                                      ((width,), "vector"), ((width,), "vector")]
    return shapes + [((width,), "vector")]


def _maybe(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def implementations(algorithm: str, heavyball_compile: bool, psgd_probability: float = 1.0):
    """[(label, factory(list of (param, role)) -> optimizer or None if not installed)]."""
    po, hb, kron, sf = _maybe("pytorch_optimizer"), _maybe("heavyball"), _maybe("kron_torch"), _maybe("schedulefree")
    if hb is not None and not heavyball_compile:
        hb.utils.compile_mode = None

    def plain(ps):
        return [p for p, _ in ps]

    def roles(ps):  # one group per role, as whiten.param_groups gives them
        groups: dict = {}
        for p, r in ps:
            groups.setdefault(r, []).append(p)
        return [{"params": group, "role": r} for r, group in groups.items()]

    if algorithm == "soap":
        return [
            ("whiten.SOAP", lambda ps: whiten.SOAP(roles(ps), precondition_frequency=FREQ)),
            ("pytorch_optimizer.SOAP", po and (lambda ps: po.SOAP(plain(ps), precondition_frequency=FREQ))),
            ("heavyball.SOAP", hb and (lambda ps: hb.SOAP(plain(ps), betas=(0.95, 0.95), precondition_frequency=FREQ,
                                                          max_precond_dim=10000, merge_dims=False,
                                                          use_precond_schedule=False))),
        ]
    if algorithm == "shampoo":
        return [
            ("whiten.Shampoo", lambda ps: whiten.Shampoo(roles(ps), precondition_frequency=FREQ)),
            ("pytorch_optimizer.ScalableShampoo", po and (lambda ps: po.ScalableShampoo(
                plain(ps), preconditioning_compute_steps=FREQ, start_preconditioning_step=1, block_size=1024))),
            ("pytorch_optimizer.Shampoo", po and (lambda ps: po.Shampoo(plain(ps), preconditioning_compute_steps=FREQ))),
        ]
    if algorithm == "psgd-kron":
        prob = psgd_probability
        rows = [("whiten.PSGDKron", lambda ps: whiten.PSGDKron(roles(ps), preconditioner_update_probability=prob))]
        if prob < 1:
            rows.append(("whiten.PSGDKron (cache_preconditioner=False)", lambda ps: whiten.PSGDKron(
                roles(ps), preconditioner_update_probability=prob, cache_preconditioner=False)))
        return rows + [
            ("kron_torch.Kron", kron and (lambda ps: kron.Kron(plain(ps), preconditioner_update_probability=prob))),
            ("pytorch_optimizer.Kron", po and (lambda ps: po.Kron(plain(ps), pre_conditioner_update_probability=prob))),
            ("heavyball.PSGDKron", hb and (lambda ps: hb.PSGDKron(plain(ps), preconditioner_update_probability=prob))),
        ]
    if algorithm == "muon":
        def torch_muon(ps):
            hidden = [p for p, r in ps if r == "hidden"]
            rest = [p for p, r in ps if r != "hidden"]
            muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0)
            adam = torch.optim.AdamW(rest, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
            return _Both(muon, adam)

        return [
            ("whiten.Muon (fp32 NS)", lambda ps: whiten.Muon(roles(ps))),
            ("whiten.Muon (bf16 NS)", lambda ps: whiten.Muon(roles(ps), ns_dtype=torch.bfloat16)),
            ("torch.optim.Muon + AdamW", torch_muon),
            ("heavyball.MuonAdamW", hb and (lambda ps: hb.MuonAdamW(plain(ps)))),
        ]
    if algorithm == "schedule-free-adamw":
        def sf_opt(ps):
            opt = sf.AdamWScheduleFree(plain(ps))
            opt.train()
            return opt

        return [
            ("whiten.ScheduleFreeAdamW", lambda ps: whiten.ScheduleFreeAdamW(roles(ps))),
            ("schedulefree.AdamWScheduleFree", sf and sf_opt),
        ]
    if algorithm == "conda":
        # the same refresh period for both (the table's period); every matrix of gpt_params is a hidden one, which
        # both project
        return [
            ("whiten.Conda", lambda ps: whiten.Conda(roles(ps), update_proj_gap=FREQ)),
            ("pytorch_optimizer.Conda",
             po and (lambda ps: po.Conda(plain(ps), update_proj_gap=FREQ, scale=0.25))),
        ]
    if algorithm == "prodigy":
        pg = _maybe("prodigyopt")
        return [
            ("whiten.Prodigy", lambda ps: whiten.Prodigy(roles(ps))),
            ("prodigyopt.Prodigy", pg and (lambda ps: pg.Prodigy(plain(ps)))),
        ]
    if algorithm == "mfac":
        # no peer runs on a CPU: the authors' M-FAC factors by LU without pivoting, which torch lacks there
        return [(f"whiten.MFAC (ngrads {MFAC_NGRADS})", lambda ps: whiten.MFAC(roles(ps), ngrads=MFAC_NGRADS))]
    if algorithm == "scion":
        # the same rule everywhere: hidden Spectral (5 Newton–Schulz steps), vectors BiasRMS, radius 1,
        # constrained, momentum 0.9 (pytorch-optimizer's 0.1 in the reference's convention)
        def po_scion(ps):
            from pytorch_optimizer.optimizer.scion import LMONorm

            # whiten.Scion's norm of each role (scion.ROLE_NORMS): a (vocab, d) embedding's rows to RMS 1
            norm_of = {"hidden": LMONorm.SPECTRAL, "head": LMONorm.SIGN, "vector": LMONorm.BIAS,
                       "embedding": LMONorm.ROW}
            return po.SCION([{"params": g["params"], "norm_type": norm_of[g["role"]]} for g in roles(ps)],
                            lr=1e-3, momentum=0.1, constraint=True)

        return [
            ("whiten.Scion (fp32 NS)", lambda ps: whiten.Scion(roles(ps), lr=1e-3, momentum=0.9)),
            ("whiten.Scion (bf16 NS)", lambda ps: whiten.Scion(roles(ps), lr=1e-3, momentum=0.9,
                                                               ns_dtype=torch.bfloat16)),
            ("pytorch_optimizer.SCION (always bf16)", po and po_scion),
        ]
    if algorithm == "specgd":  # no peer installs from PyPI; Muon's exact companion, for the cost of the SVD
        return [("whiten.SpecGD (fp32 SVD)", lambda ps: whiten.SpecGD(roles(ps))),
                ("whiten.Muon (fp32 NS), its approximation", lambda ps: whiten.Muon(roles(ps)))]
    raise ValueError(f"unknown algorithm {algorithm!r}")


class _Both:
    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--algorithms", default="soap,shampoo,psgd-kron,muon,schedule-free-adamw")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--period", type=int, default=FREQ, help="steps per round (one refresh period)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--heavyball-compile", action="store_true")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="wall: time.perf_counter; process: this process's CPU time (time.process_time), steadier "
                         "on a machine shared with other jobs, meaningful with --threads 1")
    ap.add_argument("--psgd-probability", type=float, default=1.0,
                    help="PSGD-Kron's preconditioner update probability for every implementation (1: the first 500 "
                         "steps of the default schedule; 0.03: its floor, reached near step 4000)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = gpt_params(args.width, args.blocks)
    template = [torch.randn(s) * 0.02 for s, _ in spec]
    grads = [torch.randn_like(p) for p in template]

    def params_for():
        ps = [nn.Parameter(p.clone()) for p in template]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return list(zip(ps, [r for _, r in spec]))

    runs, owned, missing = {}, {}, []
    adamw_params = params_for()
    runs["torch.optim.AdamW"] = torch.optim.AdamW([p for p, _ in adamw_params], lr=1e-3, weight_decay=0.1)
    owned["torch.optim.AdamW"] = [p for p, _ in adamw_params]
    order = [("adamw", "torch.optim.AdamW")]
    for algorithm in args.algorithms.split(","):
        for label, factory in implementations(algorithm, args.heavyball_compile, args.psgd_probability):
            if not factory:
                missing.append(label)
                continue
            ps = params_for()
            owned[label] = [p for p, _ in ps]
            try:
                runs[label] = factory(ps)
            except Exception as e:  # a peer that does not run here is reported, not fatal
                missing.append(f"{label} ({type(e).__name__}: {e})")
                continue
            order.append((algorithm, label))
    def set_grads(label):  # some peers (heavyball) clear p.grad in step(); not timed
        for p, g in zip(owned[label], grads):
            if p.grad is None:
                p.grad = g.clone()

    failed = {}
    for label, opt in list(runs.items()):  # warm-up: first steps, compile, one refresh
        try:
            for _ in range(args.period + 2):
                set_grads(label)
                opt.step()
        except Exception as e:
            failed[label] = f"{type(e).__name__}: {str(e)[:80]}"
            del runs[label]
    times = {label: [] for label in runs}
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for _ in range(args.rounds):
        for label, opt in runs.items():
            for _ in range(args.period):
                set_grads(label)
                t0 = clock()
                opt.step()
                times[label].append(clock() - t0)
    n = sum(p.numel() for p in template)
    print(f"# step time: {args.blocks} blocks of width {args.width}, {n / 1e6:.2f} M params, float32, cpu; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"# {args.rounds} interleaved rounds x {args.period} steps; refresh period {FREQ}; {args.clock} clock\n")
    print("| algorithm | implementation | median ms/step | mean ms/step (refresh amortized) | mean vs AdamW |")
    print("|---|---|---|---|---|")
    base = statistics.mean(times["torch.optim.AdamW"])
    for algorithm, label in order:
        if label not in times:
            continue
        ts = times[label]
        print(f"| {algorithm} | {label} | {statistics.median(ts) * 1e3:.1f} | {statistics.mean(ts) * 1e3:.1f} | "
              f"{statistics.mean(ts) / base:.1f}x |")
    for label, why in failed.items():
        print(f"| | {label} | failed: {why} | | |")
    for label in missing:
        print(f"| | {label} | not installed | | |")


if __name__ == "__main__":
    main()
