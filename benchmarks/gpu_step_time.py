"""The GPU table of issue 22: each algorithm's optimizer step (whiten eager, whiten under ``torch.compile``, and the
peers users would otherwise pick) on GPT shapes, and the whole training step (forward, backward, step) of the
benchmark's ``gpu`` profile against fused AdamW, in bf16 autocast. Runs on the CPU too (small shapes) so the
script is checked before a GPU is lent.

    python benchmarks/gpu_step_time.py --out gpu-step.json                      # on the GPU: every part
    python benchmarks/gpu_step_time.py --device cpu --width 64 --blocks 2 --vocab 512 --rounds 2 \\
        --train-width 64 --train-depth 2 --train-batch 4 --out /tmp/check.json  # the CPU check

Optimizer step: GPT-2-small shapes by default (``--width 768 --blocks 12 --vocab 50304``: per block q, k, v, o,
fc1, fc2, two LayerNorm gains; an embedding and a head of ``vocab`` rows), fixed random gradients, one group per
role as ``whiten.param_groups`` gives them. Each round times one refresh period (``--period`` steps, the refresh
interval of every implementation that has one) for every implementation, round-robin; the table shows the median
step (an ordinary step), the mean over the period (the refresh amortized over ``--period`` steps) and the peak
memory the optimizer adds (``torch.cuda.max_memory_allocated`` during its steps, less the parameters and
gradients), with ratios to fused AdamW measured in the same rounds. Peers that are not installed, or fail, are
listed as such: carry their wheels (``pip download heavyball pytorch-optimizer kron-torch schedulefree
--no-deps -d wheels``) to a machine without network.

Training step: the ``lm`` model of the ``gpu`` profile (width 768, depth 12, context 256, batch 256; the
character vocabulary of the benchmark's text, ``--train-vocab``) on random tokens, forward and backward under
``torch.autocast(bfloat16)``, then the step; median milliseconds over ``--train-steps`` after a warm-up that
includes a refresh, for fused AdamW and whiten's optimizers at the benchmark's settings (refresh amortized over
``--period`` steps for those that refresh; SPlus's interval of 100 is reported separately as ``amortized@100``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from family_step_time import _maybe, implementations  # noqa: E402

import whiten  # noqa: E402

ALGORITHMS = "splus,soap,shampoo,psgd-kron,muon,schedule-free-adamw,scion,conda,prodigy"


def gpt_shapes(width: int, blocks: int, vocab: int) -> list[tuple[tuple[int, ...], str]]:
    shapes = [((vocab, width), "embedding")]
    for _ in range(blocks):
        shapes += [((width, width), "hidden")] * 4 + [((4 * width, width), "hidden"), ((width, 4 * width), "hidden"),
                                                      ((width,), "vector"), ((width,), "vector")]
    return shapes + [((width,), "vector"), ((vocab, width), "head")]


def step_implementations(algorithm: str, period: int):
    """[(label, factory(list of (param, role)))] for one algorithm: family_step_time's rows, SPlus's here, each
    whiten row twice (eager, and with compiled=True: its elementwise kernels compiled), heavyball compiled and
    eager. (``torch.compile(opt.step)`` runs a whiten step eagerly: the eager row's time.)"""
    def roles(ps):
        groups: dict = {}
        for p, r in ps:
            groups.setdefault(r, []).append(p)
        return [{"params": g, "role": r} for r, g in groups.items()]

    if algorithm == "splus":
        po = _maybe("pytorch_optimizer")
        rows = [("whiten.SPlus", lambda ps: whiten.SPlus(roles(ps), inverse_every=period)),
                ("whiten.SPlus (bf16 rotations)", lambda ps: whiten.SPlus(roles(ps), inverse_every=period,
                                                                          rotation_dtype=torch.bfloat16)),
                ("pytorch_optimizer.SPlus", po and (lambda ps: po.SPlus([p for p, _ in ps],
                                                                        inverse_every=period)))]
    else:
        hb = _maybe("heavyball")
        default_mode = hb.utils.compile_mode if hb is not None else None
        rows = []
        for label, factory in implementations(algorithm, heavyball_compile=False):
            if label.startswith("heavyball") and factory:
                # heavyball reads its compile mode at every step: each row sets it, and rows run one at a time
                rows += [(label + " (eager)", _heavyball(hb, None, factory)),
                         (label + " (compiled)", _heavyball(hb, default_mode, factory))]
            else:
                rows.append((label, factory))
    out = []
    for label, factory in rows:
        out.append((label, factory))
        if label.startswith("whiten.") and factory:
            out.append((label + " compiled=True", _compiled(factory)))
    return out


def _compiled(factory):
    def build(ps):
        opt = factory(ps)
        opt.compiled = True  # as compiled=True in the constructor
        return opt
    return build


def _heavyball(hb, mode, factory):
    def build(ps):
        hb.utils.compile_mode = mode
        torch._dynamo.reset()
        return factory(ps)
    return build


class _Fused:
    def __init__(self, params):
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)

    def step(self):
        self.opt.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, n: int, device) -> list[float]:
    """Milliseconds of each of ``n`` calls, the device drained before and after each."""
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _peak(device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def _progress(record: dict) -> None:
    """Each row as soon as it is measured: a run cut off by its time limit still brings back what it measured."""
    print("  done: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}),
          flush=True)


def step_table(args, device) -> list[dict]:
    torch.manual_seed(0)
    spec = gpt_shapes(args.width, args.blocks, args.vocab)
    template = [torch.randn(s, device=device) * 0.02 for s, _ in spec]
    grads = [torch.randn_like(p) for p in template]
    rows = [("torch.optim.AdamW (fused)" if device.type == "cuda" else "torch.optim.AdamW",
             lambda ps: _Fused([p for p, _ in ps]) if device.type == "cuda"
             else torch.optim.AdamW([p for p, _ in ps], lr=1e-3, weight_decay=0.1))]
    for algorithm in args.algorithms.split(","):
        rows += step_implementations(algorithm, args.period)
    results = []
    baseline = None
    for label, factory in rows:  # one at a time: each implementation's memory alone
        record = {"label": label}
        results.append(record)
        if not factory:
            record["missing"] = "not installed"
            continue
        ps = [nn.Parameter(p.clone()) for p in template]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        pairs = list(zip(ps, [r for _, r in spec]))
        try:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            opt = factory(pairs)

            def one():
                for p, g in zip(ps, grads):
                    if p.grad is None:  # some peers (heavyball) clear p.grad
                        p.grad = g.clone()
                opt.step()

            t0 = time.perf_counter()
            for _ in range(args.period + 2):  # first steps, compile, one refresh
                one()
            _sync(device)
            record["warmup_s"] = time.perf_counter() - t0
            times = _timed(one, args.rounds * args.period, device)
            record.update(median_ms=statistics.median(times), mean_ms=statistics.fmean(times),
                          peak_extra_mib=(_peak(device) - before) / 2**20)
            if baseline is None:
                baseline = record
        except Exception as e:  # a peer that does not run here is reported, not fatal
            record["failed"] = f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            del ps, pairs
            opt = None
        _progress(record)
    for r in results:
        if "median_ms" in r and baseline is not None:
            r["median_vs_adamw"] = r["median_ms"] / baseline["median_ms"]
            r["mean_vs_adamw"] = r["mean_ms"] / baseline["mean_ms"]
    return results


TRAIN_OPTIMIZERS = ["adamw", "splus", "splus+syncfree", "splus+nocheck", "splus+compiled", "splus-bf16", "soap",
                    "soap+compiled", "muon", "muon+compiled", "psgd-kron", "schedule-free-adamw",
                    "schedule-free-adamw+syncfree", "schedule-free-adamw+compiled", "scion"]
# "<name>+nocheck": the optimizer with its non-finite check turned off (no host sync: a non-finite gradient would
# reach the state). Not a setting for training; it measures what the check's one host sync per step costs in a
# pipelined loop, the most that a device-side check could save (issue 22, item 1). "<name>+syncfree": with
# sync_free=True (the check decided on the device, writes masked: no host sync, more kernels).
NOCHECK, SYNCFREE, COMPILED = "+nocheck", "+syncfree", "+compiled"  # "+compiled": compiled=True


def train_table(args, device) -> list[dict]:
    from whiten.bench.models import GPT
    from whiten.bench.registry import build_optimizer, get_spec

    results = []
    for name in args.train_optimizers.split(","):
        record = {"optimizer": name}
        results.append(record)
        try:
            torch.manual_seed(0)
            model = GPT(vocab_size=args.train_vocab, ctx=args.train_ctx, width=args.train_width,
                        depth=args.train_depth, heads=args.train_heads).to(device)
            base_name = name.removesuffix(NOCHECK).removesuffix(SYNCFREE).removesuffix(COMPILED)
            spec = get_spec(base_name)
            if base_name == "adamw" and device.type == "cuda":
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
                record["note"] = "fused"
            else:
                opt = build_optimizer(spec, model, spec.default_lr, args.train_width)
            if name.endswith(NOCHECK):
                opt.grads_are_finite = lambda work: True
                record["note"] = "finiteness check off (no host sync)"
            if name.endswith(SYNCFREE):
                opt.sync_free = True  # as sync_free=True in the constructor (the registry builds it)
                record["note"] = "sync_free=True"
            if name.endswith(COMPILED):
                opt.compiled = True  # as compiled=True in the constructor
                record["note"] = "compiled=True"
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randint(0, args.train_vocab, (args.train_batch, args.train_ctx), generator=g).to(device)
            y = torch.randint(0, args.train_vocab, (args.train_batch, args.train_ctx), generator=g).to(device)

            def one():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x)
                loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
                loss.backward()
                opt.step()

            for _ in range(3):
                one()
            times = _timed(one, args.train_steps, device)
            record.update(median_ms=statistics.median(times), mean_ms=statistics.fmean(times))
            # the same steps back to back, drained once at the end: the host runs ahead of the device as in a
            # training loop, which a host sync inside the step stops
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                one()
            _sync(device)
            record["pipelined_ms"] = (time.perf_counter() - t0) * 1e3 / args.train_steps
        except Exception as e:
            record["failed"] = f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            model = opt = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _progress(record)
    base = next((r for r in results if r["optimizer"] == "adamw" and "median_ms" in r), None)
    for r in results:
        if base and "median_ms" in r:
            r["median_vs_adamw"] = r["median_ms"] / base["median_ms"]
            r["mean_vs_adamw"] = r["mean_ms"] / base["mean_ms"]
            r["pipelined_vs_adamw"] = r["pipelined_ms"] / base["pipelined_ms"]
    return results


def _print_step(results):
    print("| implementation | median ms/step | mean ms/step (refresh amortized) | vs AdamW (median, mean) | "
          "peak extra MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        if "median_ms" not in r:
            print(f"| {r['label']} | {r.get('missing') or r.get('failed')} | | | |")
            continue
        print(f"| {r['label']} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | {r.get('median_vs_adamw', 0):.2f}x, "
              f"{r.get('mean_vs_adamw', 0):.2f}x | {r['peak_extra_mib']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="step,train")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--algorithms", default=ALGORITHMS)
    ap.add_argument("--period", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-optimizers", default=",".join(TRAIN_OPTIMIZERS))
    ap.add_argument("--train-width", type=int, default=768)
    ap.add_argument("--train-depth", type=int, default=12)
    ap.add_argument("--train-heads", type=int, default=12)
    ap.add_argument("--train-ctx", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--train-vocab", type=int, default=65)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write every number here as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "args": vars(args)}
    print(f"# {record['device']}, torch {torch.__version__}, {record['date']}", flush=True)
    parts = args.parts.split(",")
    if "step" in parts:
        record["step"] = step_table(args, device)
        print(f"\n## Optimizer step, width {args.width}, {args.blocks} blocks, vocabulary {args.vocab}, "
              f"period {args.period}")
        _print_step(record["step"])
    if "train" in parts:
        record["train"] = train_table(args, device)
        print(f"\n## Training step (bf16 autocast), width {args.train_width}, depth {args.train_depth}, "
              f"batch {args.train_batch} x {args.train_ctx}")
        print("| optimizer | median ms | mean ms | pipelined ms | vs AdamW (median, mean, pipelined) |\n"
              "|---|---|---|---|---|")
        for r in record["train"]:
            if "median_ms" in r:
                print(f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | {r['pipelined_ms']:.1f} | "
                      f"{r.get('median_vs_adamw', 0):.2f}x, {r.get('mean_vs_adamw', 0):.2f}x, "
                      f"{r.get('pipelined_vs_adamw', 0):.2f}x |")
            else:
                print(f"| {r['optimizer']} | {r['failed']} | | | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
