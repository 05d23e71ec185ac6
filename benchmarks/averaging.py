"""Does evaluating SPlus's parameter average beat its live parameters? Averaged vs live vs AdamW, one run each.

Every averaging rule is measured in the SAME training run: the run keeps one average per rule of the pre-update
parameters (as the optimizers do) and evaluates the live parameters and every average at each evaluation point,
so the comparison is free of seed and trajectory noise. Training itself never depends on an average.

Settings:
  lm-constant, lm-cosine  the benchmark's ``lm`` task (``cpu`` profile, whiten.bench's model, data, warm-up and
                          optimizer registry), 5% warm-up then constant or cosine lr.
  nanogpt                 a nanoGPT-style loop (benchmarks/nanogpt_style.py: tied head, dropout 0.2, warm-up,
                          cosine to lr/10 written into every group, grad clip 1.0) on the same Shakespeare text.

Averaging rules (c_t: the weight of the step-t parameters in ``avg <- avg + c_t (theta - avg)``, t from 1):
  ema0.999      fixed EMA 0.999, bias-corrected: c_t = (1-r)/(1-r^t)
  horizon       fixed EMA r = 1 - 10/steps (the paper's 0.999 at 10k steps; needs the run length)
  power0.1      c_t = min(1, 10/t): an average over the last ~10% of the steps taken (weights ~ (s/t)^9)
  power0.1-lr   c_t = min(1, 1/(0.1 t rho_t)), rho_t = lr_t / max lr so far: as power0.1 at constant lr, and
                shrinking to the live parameters as a schedule decays the lr

    python benchmarks/averaging.py run --out results/averaging      # resumable: finished runs are skipped
    python benchmarks/averaging.py report results/averaging         # Markdown tables
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import whiten  # noqa: E402
from nanogpt_style import GPT, GPTConfig, adamw_groups, estimate_loss, get_lr  # noqa: E402
from whiten.bench.data import CharCorpus, load_shakespeare  # noqa: E402
from whiten.bench.registry import build_optimizer, get_spec  # noqa: E402
from whiten.bench.tasks import lr_factor, make_task  # noqa: E402

RULES = ("ema0.999", "horizon", "power0.1", "power0.1-lr")
# Each optimizer's best lr on lm at 500 steps (docs/results, README); nanoGPT's own lr for its AdamW.
LRS = {("lm", "adamw"): 4.64e-3, ("lm", "splus"): 0.1, ("nanogpt", "adamw"): 1e-3, ("nanogpt", "splus"): 0.1}


def rule_weight(rule: str, t: int, rho: float, steps: int) -> float:
    if rule in ("ema0.999", "horizon"):
        r = 0.999 if rule == "ema0.999" else 1.0 - 10.0 / steps
        return (1.0 - r) / (1.0 - r**t)
    window = 0.1 * t * (rho if rule.endswith("-lr") else 1.0)
    return 1.0 if window <= 1.0 else 1.0 / window


class Averages:
    def __init__(self, params, steps):
        self.params, self.steps, self.t, self.lr_max = list(params), steps, 0, 0.0
        self.avg = {r: [p.detach().clone() for p in self.params] for r in RULES}

    @torch.no_grad()
    def update(self, lr):  # before the optimizer's step: the average is of the pre-update parameters
        self.t += 1
        self.lr_max = max(self.lr_max, lr)
        rho = lr / self.lr_max if self.lr_max > 0 else 1.0
        for r in RULES:
            torch._foreach_lerp_(self.avg[r], self.params, rule_weight(r, self.t, rho, self.steps))

    @torch.no_grad()
    def evaluate(self, evaluate):
        out = {"live": evaluate()}
        live = [p.detach().clone() for p in self.params]
        for r in RULES:
            torch._foreach_copy_(self.params, self.avg[r])
            out[r] = evaluate()
        torch._foreach_copy_(self.params, live)
        return out


def run_lm(schedule, opt_name, lr, seed, steps, evals):
    task = make_task("lm", "cpu")
    model = task.build_model(seed)
    opt = build_optimizer(get_spec(opt_name), model, lr, task.width, steps)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, int(0.05 * steps))
    avg = Averages(model.parameters(), steps) if opt_name == "splus" else None

    def evaluate():
        model.eval()
        loss = task.evaluate(model)["val_loss"]
        model.train()
        return loss

    for step in range(steps):
        factor = lr_factor(step, steps, warmup, schedule)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * factor
        loss = task.loss(model, task.train_batch(seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if avg:
            avg.update(lr * factor)
        opt.step()
        if step + 1 in evals:
            yield step + 1, (avg.evaluate(evaluate) if avg else {"live": evaluate()})


def run_nanogpt(opt_name, lr, seed, steps, evals):
    corpus = CharCorpus(load_shakespeare())
    cfg = GPTConfig(vocab_size=corpus.vocab_size)
    torch.manual_seed(seed)
    model = GPT(cfg)
    if opt_name == "adamw":
        opt = torch.optim.AdamW(adamw_groups(model, 0.1), lr=lr, betas=(0.9, 0.99))
    else:
        opt = whiten.SPlus(whiten.param_groups(model), lr=lr, nonstandard_constant=1.0 / cfg.n_embd)
    val = corpus.val_batches(cfg.block_size, 256, 64)
    warmup, min_lr = max(1, steps // 20), lr / 10
    avg = Averages(model.parameters(), steps) if opt_name == "splus" else None
    for it in range(steps):
        now = get_lr(it, lr, warmup, steps, min_lr)
        for g in opt.param_groups:
            g["lr"] = now
        gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
        x, y = corpus.train_batch(32, cfg.block_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if avg:
            avg.update(now)
        opt.step()
        if it + 1 in evals:
            fn = lambda: estimate_loss(model, val)  # noqa: E731
            yield it + 1, (avg.evaluate(fn) if avg else {"live": fn()})


def cmd_run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    for seed in map(int, args.seeds.split(",")):
        for setting in args.settings.split(","):
            for opt_name in args.optimizers.split(","):
                family = "nanogpt" if setting == "nanogpt" else "lm"
                steps = args.nanogpt_steps if family == "nanogpt" else args.steps
                lr = LRS[(family, opt_name)]
                path = out / f"{setting}-{opt_name}-lr{lr:g}-seed{seed}.json"
                if path.exists():
                    continue
                evals = {steps // 2, steps}  # evaluation is costly: 5 passes over the held-out set
                t0 = time.perf_counter()
                gen = (run_nanogpt(opt_name, lr, seed, steps, evals) if family == "nanogpt"
                       else run_lm(setting.split("-")[1], opt_name, lr, seed, steps, evals))
                records = [{"step": s, **m} for s, m in gen]
                rec = {"setting": setting, "optimizer": opt_name, "lr": lr, "seed": seed, "steps": steps,
                       "seconds": time.perf_counter() - t0, "evals": records,
                       "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                       "torch": torch.__version__}
                path.write_text(json.dumps(rec, indent=1))
                print(path.name, json.dumps(records[-1]), f"{rec['seconds']:.0f}s", flush=True)


def cmd_report(args):
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("*.json"))]
    settings = sorted({r["setting"] for r in runs}, key=lambda s: ["lm-constant", "lm-cosine", "nanogpt"].index(s))

    def stat(xs):
        m = sum(xs) / len(xs)
        return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)

    lines = []
    cols = ["live"] + list(RULES)
    lines.append("| setting | AdamW (live) | SPlus " + " | SPlus ".join(cols) + " |")
    lines.append("|---" * (2 + len(cols)) + "|")
    for s in settings:
        final = lambda r: r["evals"][-1]  # noqa: E731
        adam = [final(r)["live"] for r in runs if r["setting"] == s and r["optimizer"] == "adamw"]
        sp = [r for r in runs if r["setting"] == s and r["optimizer"] == "splus"]
        def cell(xs):  # mean ± std over seeds; a single seed is shown alone
            if not xs:
                return "—"
            return f"{stat(xs)[0]:.3f} ± {stat(xs)[1]:.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

        cells = [cell(adam)] + [cell([final(r)[c] for r in sp]) for c in cols]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Averaged minus live (SPlus, per seed, mean over seeds) at each evaluation step:")
    lines.append("")
    for s in settings:
        sp = [r for r in runs if r["setting"] == s and r["optimizer"] == "splus"]
        if not sp:
            continue
        lines.append(f"{s} (seeds {', '.join(str(r['seed']) for r in sp)}):")
        lines.append("")
        lines.append("| step | live | " + " | ".join(RULES) + " |")
        lines.append("|---" * (2 + len(RULES)) + "|")
        for i, e in enumerate(sp[0]["evals"]):
            live = stat([r["evals"][i]["live"] for r in sp])[0]
            diffs = [stat([r["evals"][i][c] - r["evals"][i]["live"] for r in sp])[0] for c in RULES]
            lines.append(f"| {e['step']} | {live:.3f} | " + " | ".join(f"{d:+.3f}" for d in diffs) + " |")
        lines.append("")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="results/averaging")
    r.add_argument("--settings", default="lm-constant,lm-cosine,nanogpt")
    r.add_argument("--optimizers", default="splus,adamw")
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--steps", type=int, default=500)
    r.add_argument("--nanogpt-steps", type=int, default=600)
    r.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("report")
    p.add_argument("dir")
    args = ap.parse_args()
    cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
