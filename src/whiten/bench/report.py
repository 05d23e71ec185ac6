"""Tables and plots from a results directory: one section per (task, profile, starting point)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .metrics import best_lr, fraction_to_target, mean_std, significantly_lower

BASELINE = "adamw"


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(Path(root).glob("**/done.json")):
        summary = json.loads(path.read_text())
        summary["dir"] = str(path.parent)
        runs.append(summary)
    return runs


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "> 1" if mean == math.inf else "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _fraction(mean: float, std: float) -> str:
    return "> 1 (not reached)" if mean == math.inf else _fmt(mean, std, 2)


def summarize(runs: list[dict]) -> dict:
    """{(task, profile, start): {optimizer: {lr: [run, ...]}}}"""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        c = r["config"]
        out[(c["task"], c["profile"], c["start"])][c["optimizer"]][c["lr"]].append(r)
    return out


def section(key, by_opt: dict, plots_dir: Path | None) -> list[str]:
    task, profile, start = key
    lines = [f"## {task} · profile {profile} · start {start}", ""]
    best = {}
    for name, by_lr in by_opt.items():
        finals = {lr: [r["final_val_loss"] for r in rs] for lr, rs in by_lr.items()}
        lr, edge = best_lr(finals)
        best[name] = (lr, edge, by_lr[lr])
    base = best.get(BASELINE)
    steps = {r["config"]["steps"] for rs in by_opt.values() for runs in rs.values() for r in runs}
    seeds = sorted({r["config"]["seed"] for rs in by_opt.values() for runs in rs.values() for r in runs})
    lines.append(f"{max(steps)} steps per run, seeds {seeds}; best lr = lowest mean final validation loss; "
                 "steps/time-to-AdamW = fraction of AdamW's steps/seconds (at AdamW's best lr) needed to reach "
                 "AdamW's final validation loss, per seed, interpolated between evaluations.")
    lines.append("")
    lines.append("| optimizer | best lr | final val loss | steps-to-AdamW | time-to-AdamW | s/step | diverged | "
                 "lower than AdamW? |")
    lines.append("|---|---|---|---|---|---|---|---|")
    base_by_seed = {r["config"]["seed"]: r for r in base[2]} if base else {}
    for name, (lr, edge, runs) in sorted(best.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])):
        finals = [r["final_val_loss"] for r in runs]
        f_mean, f_std = mean_std(finals)
        sta, tta = [], []
        for r in runs:
            b = base_by_seed.get(r["config"]["seed"])
            if b is None or b["diverged"]:
                continue
            s, t = fraction_to_target(r["records"], b["records"])
            sta.append(s)
            tta.append(t)
        n_div = sum(r["diverged"] for rs in by_opt[name].values() for r in rs)
        n_all = sum(len(rs) for rs in by_opt[name].values())
        sig = "—" if name == BASELINE or base is None else \
            {True: "yes (> 2 s.e.)", False: "no", None: "n/a (1 seed)"}[
                significantly_lower(finals, [r["final_val_loss"] for r in base[2]])]
        sps = mean_std([r["seconds_per_step"] for r in runs])[0]
        lines.append(f"| {name} | {lr:.3g}{' (edge of grid)' if edge else ''} | {_fmt(f_mean, f_std)} | "
                     f"{_fraction(*mean_std(sta)) if sta else 'n/a'} | {_fraction(*mean_std(tta)) if tta else 'n/a'} | "
                     f"{sps:.3f} | {n_div}/{n_all} | {sig} |")
    extra = [k for r in base[2] for k in r if k.startswith("final_val_") and k != "final_val_loss"] if base else []
    for metric in sorted(set(extra)):
        lines.append("")
        lines.append(f"{metric.replace('final_', '')} at best lr: " + ", ".join(
            f"{name} {_fmt(*mean_std([r.get(metric, math.nan) for r in runs]))}" for name, (_, _, runs) in best.items()))
    lines += ["", "Final validation loss by learning rate (mean over seeds; ∞ = diverged):", ""]
    all_lrs = sorted({lr for by_lr in by_opt.values() for lr in by_lr})
    lines.append("| optimizer | " + " | ".join(f"{lr:.3g}" for lr in all_lrs) + " |")
    lines.append("|---|" + "---|" * len(all_lrs))
    for name, by_lr in sorted(by_opt.items()):
        cells = []
        for lr in all_lrs:
            if lr not in by_lr:
                cells.append("")
                continue
            m = mean_std([r["final_val_loss"] for r in by_lr[lr]])[0]
            cells.append("∞" if m == math.inf else f"{m:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    overhead = [r["data_seconds"] / r["train_seconds"] for rs in by_opt.values() for runs in rs.values()
                for r in runs if r["train_seconds"] > 0]
    if overhead:
        lines += ["", f"Harness overhead (data loading share of the timed training loop): "
                      f"median {sorted(overhead)[len(overhead) // 2] * 100:.1f}%."]
    if plots_dir is not None:
        names = _plots(key, best, by_opt, plots_dir)
        lines += [""] + [f"![{n}](plots/{n})" for n in names]
    return lines + [""]


def _plots(key, best, by_opt, plots_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join(key).replace("@", "")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (name, (lr, _, runs)) in enumerate(sorted(best.items())):
        color = f"C{i}"
        for j, r in enumerate(runs):
            recs = [x for x in r["records"] if math.isfinite(x["val_loss"])]
            label = f"{name} (lr {lr:.3g})" if j == 0 else None
            axes[0].plot([x["step"] for x in recs], [x["val_loss"] for x in recs], color=color, label=label, alpha=0.8)
            axes[1].plot([x["seconds"] for x in recs], [x["val_loss"] for x in recs], color=color, label=label,
                         alpha=0.8)
        by_lr = by_opt[name]
        lrs = sorted(by_lr)
        means = [mean_std([r["final_val_loss"] for r in by_lr[x]])[0] for x in lrs]
        axes[2].plot([x for x, m in zip(lrs, means) if math.isfinite(m)], [m for m in means if math.isfinite(m)],
                     "o-", color=color, label=name)
    finals = [r["final_val_loss"] for _, _, runs in best.values() for r in runs if math.isfinite(r["final_val_loss"])]
    starts = [r["records"][0]["val_loss"] for _, _, runs in best.values() for r in runs]
    if finals:
        top = min(max(starts), min(finals) + 1.5 * (max(finals) - min(finals)) + 0.3)
        for ax in axes[:2]:
            ax.set_ylim(min(finals) - 0.02, top)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds")
    axes[2].set_xlabel("learning rate")
    axes[2].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_title("final validation loss vs lr")
    axes[0].set_title(f"{key[0]} ({key[1]}, start {key[2]}): best lr per optimizer")
    fig.tight_layout()
    name = f"{stem}.png"
    fig.savefig(plots_dir / name, dpi=90)
    plt.close(fig)
    return [name]


def write_report(root: Path, plots: bool = True) -> Path:
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {root} (looked for */done.json)")
    lines = ["# whiten-bench report", "", f"Results directory: `{root}` ({len(runs)} finished runs).", ""]
    for key, by_opt in sorted(summarize(runs).items()):
        lines += section(key, by_opt, root / "plots" if plots else None)
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
