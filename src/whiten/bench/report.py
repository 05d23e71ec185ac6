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
    lines += _validation_note(by_opt)
    lines.append("| optimizer | best lr | final val loss | steps-to-AdamW | time-to-AdamW | s/step | diverged | "
                 "lower than AdamW? |")
    lines.append("|---|---|---|---|---|---|---|---|")
    base_by_seed = {r["config"]["seed"]: r for r in base[2]} if base else {}
    fractions = {}  # name -> (mean steps-to-AdamW, mean time-to-AdamW), for the plots
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
        if sta:
            fractions[name] = (mean_std(sta)[0], mean_std(tta)[0])
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
        names = _plots(key, best, by_opt, fractions, plots_dir)
        lines += [""] + [f"![{n}](plots/{n})" for n in names]
    return lines + [""]


def _validation_note(by_opt: dict) -> list[str]:
    """The lm task's validation set, from a run's config.json: a small --text gets fewer windows than the
    profile's, and a reader of the numbers should know."""
    for runs in (r for by_lr in by_opt.values() for rs in by_lr.values() for r in rs):
        path = Path(runs["dir"]) / "config.json" if "dir" in runs else None
        if path is None or not path.exists():
            continue
        tc = json.loads(path.read_text()).get("task_config", {})
        if "val_windows" not in tc:
            return []  # runs from before the validation set was recorded
        line = (f"Validation set: {tc['val_windows']} windows of {tc['ctx'] + 1} characters from the held-out last "
                f"10% of {tc.get('text', 'the text')}")
        if tc["val_windows"] < tc["val_windows_wanted"]:
            line += (f", fewer than the profile's {tc['val_windows_wanted']}: the text ({tc['text_chars']:,} "
                     f"characters) is too short for more, so validation losses are noisier than usual")
        return [line + ".", ""]
    return []


# Tick marks for a log-scaled loss axis: round numbers, as many as fit without crowding.
_MANTISSAS = (1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2, 2.2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9)


def _log_ticks(lo: float, hi: float, count: int = 9) -> list[float]:
    gap = (math.log(hi) - math.log(lo)) / count
    candidates = sorted(m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                        for m in _MANTISSAS)
    ticks = []
    for c in candidates:
        if lo <= c <= hi and (not ticks or math.log(c) - math.log(ticks[-1]) >= gap):
            ticks.append(c)
    return ticks


def _plots(key, best, by_opt, fractions, plots_dir: Path) -> list[str]:
    """One figure per (task, profile, start): validation loss against steps and against seconds for each optimizer
    at its best lr, with AdamW's final loss as a line and a marker where each optimizer first reaches it (the
    steps-to-AdamW / time-to-AdamW of the table); final loss against lr only when a sweep ran several lrs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    plots_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join(key).replace("@", "")
    sweep = any(len(by_lr) > 1 for by_lr in by_opt.values())
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(18 if sweep else 12, 6))
    names = sorted(best, key=lambda n: (n != BASELINE, n))  # AdamW first, in C0 blue
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    base = best.get(BASELINE)
    target = mean_std([r["final_val_loss"] for r in base[2]])[0] if base else math.nan
    totals = {"step": mean_std([r["records"][-1]["step"] for r in base[2]])[0],
              "seconds": mean_std([r["records"][-1]["seconds"] for r in base[2]])[0]} if base else {}

    finite = [x["val_loss"] for n in names for r in best[n][2] for x in r["records"] if math.isfinite(x["val_loss"])]
    lo, hi = min(finite) * 0.97, max(finite) * 1.03
    for ax, xkey, xlabel, what in ((axes[0], "step", "step", "steps"),
                                   (axes[1], "seconds", "training seconds", "time")):
        for k, name in enumerate(names):
            lr, _, runs = best[name]
            for r in runs:  # one line per seed
                recs = [x for x in r["records"] if math.isfinite(x["val_loss"])]
                ax.plot([x[xkey] for x in recs], [x["val_loss"] for x in recs], color=colors[name], lw=1.6, alpha=0.85)
            frac = fractions.get(name, (math.nan, math.nan))[0 if xkey == "step" else 1]
            if name != BASELINE and math.isfinite(frac) and math.isfinite(target):
                x = frac * totals[xkey]
                ax.plot([x, x], [lo, target], ":", color=colors[name], lw=1.2)
                ax.plot([x], [target], "o", color=colors[name], ms=9, mec="black", mew=0.8, zorder=5)
                right = x > 0.8 * max(rec[xkey] for r in runs for rec in r["records"])  # keep the text inside
                ax.annotate(f"{frac:.2f}×", (x, target), xytext=(-4 if right else 4, 6 + 13 * (k % 3)),
                            textcoords="offset points", ha="right" if right else "left", fontsize=10,
                            color=colors[name], fontweight="bold")
        if math.isfinite(target):
            ax.axhline(target, color="black", ls="--", lw=1)  # named in the legend: a label here hides curves
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(_log_ticks(lo, hi)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(xlabel, fontsize=11)
        ax.set_title(f"marker: {what} to AdamW's final loss, × AdamW's {what}", fontsize=11)
    if sweep:
        ax = axes[2]
        for name in names:
            by_lr = by_opt[name]
            lrs = sorted(by_lr)
            means = [mean_std([r["final_val_loss"] for r in by_lr[x]])[0] for x in lrs]
            ax.plot([x for x, m in zip(lrs, means) if math.isfinite(m)], [m for m in means if math.isfinite(m)],
                    "o-", color=colors[name], ms=5)
            lr = best[name][0]
            ax.plot([lr], [mean_std([r["final_val_loss"] for r in by_lr[lr]])[0]], "*", color=colors[name], ms=15,
                    mec="black", mew=0.6, zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate", fontsize=11)
        ax.set_title("final loss vs lr (★ best; diverged lrs not drawn)", fontsize=11)
    for ax in axes:
        ax.set_ylabel("validation loss", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=10)

    def label(name):
        lr, edge, _ = best[name]
        text = f"{name}, lr {lr:.3g}{' (grid edge)' if edge else ''}"
        if name == BASELINE or name not in fractions:
            return text
        s, t = fractions[name]
        return text + (f": {s:.2f}× steps, {t:.2f}× time" if math.isfinite(s) else ": never reaches AdamW")

    handles = [plt.Line2D([], [], color=colors[n], lw=2.5) for n in names]
    labels = [label(n) for n in names]
    if math.isfinite(target):
        handles.append(plt.Line2D([], [], color="black", ls="--", lw=1))
        labels.append(f"AdamW's final loss {target:.3f}")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
               fontsize=11, frameon=False)
    fig.suptitle(f"{key[0]} · {key[1]} profile · start {key[2]}: validation loss at each optimizer's best lr",
                 fontsize=13)
    fig.tight_layout()
    name = f"{stem}.png"
    fig.savefig(plots_dir / name, dpi=100, bbox_inches="tight")
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
