"""Tables and plots from a results directory: one section per (task, profile and width, starting point); a
stability section (refresh interval x lr) where runs set --refresh; a learning-rate transfer section where runs of
several widths share a task, profile and start."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .metrics import (LOADED_UTILIZATION, best_lr, fraction_to_target, mean_std, significantly_lower, speedup_test,
                      unstable, utilization)
from .models import PROFILES

BASELINE = "adamw"
CLOCKS = {"wall": "seconds", "cpu": "cpu_seconds"}  # --clock -> the records' key


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


def variant(config: dict) -> str:
    """The optimizer and what changes it ("shampoo refresh=100"), from a run's config (as RunConfig.variant)."""
    extra = ([f"refresh={config['refresh']}"] if config.get("refresh") is not None else []) + \
        [f"{k}={v}" for k, v in config.get("options") or ()] + \
        ([f"warmup={config['warmup']}"] if config.get("warmup", -1) != -1 else [])
    return " ".join([config["optimizer"], *extra])


def run_width(run: dict) -> int:
    """The model width a run trained (its --width, else its profile's)."""
    c = run["config"]
    if c.get("width"):
        return c["width"]
    return run.get("identity", {}).get("task", {}).get("width") or PROFILES[c["profile"]][c["task"]]["width"]


def summarize(runs: list[dict]) -> dict:
    """{(task, profile, start): {optimizer variant: {lr: [run, ...]}}}; the profile reads "cpu-w64" for --width 64."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    steps: dict = defaultdict(set)
    for r in runs:
        c = r["config"]
        steps[(c["task"], c["profile"], c.get("width"), c["start"])].add(c["steps"])
    for r in runs:
        c = r["config"]
        profile = c["profile"] if not c.get("width") else f"{c['profile']}-w{c['width']}"
        if len(steps[(c["task"], c["profile"], c.get("width"), c["start"])]) > 1:  # tune's budgets: one section each
            profile += f"-{c['steps']}steps"
        out[(c["task"], profile, c["start"])][variant(c)][c["lr"]].append(r)
    return out


def _baseline(names) -> str | None:
    """The AdamW row: plain ``adamw``, or the one AdamW variant when --opt changed every optimizer."""
    if BASELINE in names:
        return BASELINE
    adamw = [n for n in names if n.split(" ")[0] == BASELINE]
    return adamw[0] if len(adamw) == 1 else None


def section(key, by_opt: dict, plots_dir: Path | None, clock: str = "wall") -> list[str]:
    task, profile, start = key
    ckey = CLOCKS[clock]
    lines = [f"## {task} · profile {profile} · start {start}", ""]
    best = {}
    for name, by_lr in by_opt.items():
        finals = {lr: [r["final_val_loss"] for r in rs] for lr, rs in by_lr.items()}
        lr, edge = best_lr(finals)
        best[name] = (lr, edge, by_lr[lr])
    base_name = _baseline(best)
    base = best.get(base_name)
    every = [r for rs in by_opt.values() for runs in rs.values() for r in runs]
    steps = {r["config"]["steps"] for r in every}
    seeds = sorted({r["config"]["seed"] for r in every})
    what = "seconds" if clock == "wall" else "CPU seconds"
    lines.append(f"{max(steps)} steps per run, seeds {seeds}; best lr = lowest mean final validation loss; "
                 f"steps/time-to-AdamW = fraction of AdamW's steps/{what} (at AdamW's best lr) needed to reach "
                 "AdamW's final validation loss, per seed, interpolated between evaluations; AdamW's own are 1.")
    lines.append("")
    lines += _validation_note(by_opt)
    lines += _load_warning(every, clock)
    lines.append(f"| optimizer | best lr | final val loss | steps-to-AdamW | time-to-AdamW ({clock}) | s/step | "
                 "diverged | lower than AdamW? |")
    lines.append("|---|---|---|---|---|---|---|---|")
    base_by_seed = {r["config"]["seed"]: r for r in base[2]} if base else {}
    fractions = {}  # name -> (mean steps-to-AdamW, mean time-to-AdamW), for the plots
    tests = {}  # name -> (speedup_test of steps, of time)
    for name, (lr, edge, runs) in sorted(best.items(), key=lambda kv: (kv[0] != base_name, kv[0])):
        finals = [r["final_val_loss"] for r in runs]
        f_mean, f_std = mean_std(finals)
        sta, tta = [], []
        for r in runs:
            b = base_by_seed.get(r["config"]["seed"])
            if b is None or b["diverged"]:
                continue
            s, t = fraction_to_target(r["records"], b["records"], clock=ckey)
            sta.append(s)
            tta.append(t)
        if sta:
            fractions[name] = (mean_std(sta)[0], mean_std(tta)[0])
            if name != base_name:
                tests[name] = (speedup_test(sta), speedup_test(tta))
        n_div = sum(r["diverged"] for rs in by_opt[name].values() for r in rs)
        n_all = sum(len(rs) for rs in by_opt[name].values())
        sig = "—" if name == base_name or base is None else \
            {True: "yes (> 2 s.e.)", False: "no", None: "n/a (1 seed)"}[
                significantly_lower(finals, [r["final_val_loss"] for r in base[2]])]
        sps = mean_std([r["seconds_per_step"] for r in runs])[0]
        time_cell = "n/a" if not tta or any(math.isnan(t) for t in tta) else _fraction(*mean_std(tta))
        lines.append(f"| {name} | {lr:.3g}{' (edge of grid)' if edge else ''} | {_fmt(f_mean, f_std)} | "
                     f"{_fraction(*mean_std(sta)) if sta else 'n/a'} | {time_cell} | "
                     f"{sps:.3f} | {n_div}/{n_all} | {sig} |")
    if any(st["n"] >= 2 for st, _ in tests.values()):
        lines += ["", "Steps and time to AdamW's final loss over seeds: mean [95% interval, mean ± t(0.975, n-1) · "
                      "s/√n]; below 1 significantly = a one-sided t-test of \"fraction < 1\" at the 5% level "
                      "(t = (mean - 1)/(s/√n) below -t(0.95, n-1): 6.31 for 2 seeds).", "",
                  "| optimizer | steps-to-AdamW [95%] | below 1? | time-to-AdamW [95%] | below 1? |",
                  "|---|---|---|---|---|"]
        for name, (st, tt) in sorted(tests.items()):
            lines.append(f"| {name} | {_ci(st)} | {_verdict(st)} | {_ci(tt)} | {_verdict(tt)} |")
    extra = [k for r in base[2] for k in r if k.startswith("final_val_") and k != "final_val_loss"] if base else []
    for metric in sorted(set(extra)):
        lines.append("")
        lines.append(f"{metric.replace('final_', '')} at best lr: " + ", ".join(
            f"{name} {_fmt(*mean_std([r.get(metric, math.nan) for r in runs]))}" for name, (_, _, runs) in best.items()))
    held = {name: max(r["state_bytes"] for r in runs) for name, (_, _, runs) in best.items()
            if all("state_bytes" in r for r in runs)}
    if held:  # runs recorded before whiten-bench kept it have none
        lines.append("")
        lines.append("Optimizer state at the end of a best-lr run (per process): " + ", ".join(
            f"{name} {size / 2**20:.2f} MiB" for name, size in sorted(held.items(), key=lambda kv: kv[1])) + ".")
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
        names = _plots(key, best, by_opt, fractions, plots_dir, clock, base_name)
        lines += [""] + [f"![{n}](plots/{n})" for n in names]
    return lines + [""]


def _load_warning(runs: list[dict], clock: str) -> list[str]:
    """A warning when runs on the CPU got much less CPU time than their threads could use: another job shared the
    machine, and wall-clock numbers (s/step, time-to-AdamW) overstate their cost."""
    shares = [(u, r) for r in runs if (u := utilization(r)) is not None]
    loaded = sorted((u, r) for u, r in shares if u < LOADED_UTILIZATION) if shares else []
    if not loaded:
        return []
    u, worst = loaded[0]
    c = worst["config"]
    advice = ("time-to-AdamW here is from CPU time (`--clock cpu`), less sensitive to that" if clock == "cpu" else
              "`whiten-bench report --clock cpu` computes time-to-AdamW from CPU time, less sensitive to that; "
              "better, rerun those runs on a quiet machine")
    return [f"**Warning: a loaded machine.** {len(loaded)} of {len(shares)} runs had CPU time below "
            f"{LOADED_UTILIZATION} × wall time × threads (lowest {u:.2f}: {variant(c)} lr {c['lr']:.3g} seed "
            f"{c['seed']}, {worst['threads']} threads; an idle machine gives 1.0): other work shared the cores (or "
            f"there were more threads than cores), so their wall-clock seconds overstate the cost; {advice}. CPU time "
            "is not immune either (threads that wait for a busy core spin, and shared cores run slower).", ""]


def _grid_steps(a: float, b: float) -> int:
    """How many ×10^(1/3) grid steps lie between two learning rates."""
    return int(round(abs(math.log10(b / a)) * 3))


def stability_sections(runs: list[dict], plots_dir: Path | None) -> list[str]:
    """Claim 1 of the SPlus paper: refresh interval x lr for each optimizer that ran with --refresh; divergence
    counted by :func:`metrics.unstable`; a heat map per optimizer."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in runs:
        c = r["config"]
        if c.get("refresh") is None:
            continue
        profile = c["profile"] if not c.get("width") else f"{c['profile']}-w{c['width']}"
        name = variant({**c, "refresh": None})
        groups[(c["task"], profile, c["start"])][name][c["refresh"]][c["lr"]].append(r)
    lines = []
    for key, by_opt in sorted(groups.items()):
        task, profile, start = key
        steps = max(r["config"]["steps"] for o in by_opt.values() for f in o.values() for rs in f.values() for r in rs)
        refreshes = sorted({f for o in by_opt.values() for f in o})
        lines += [f"## Stability: {task} · profile {profile} · start {start}", "",
                  f"{steps} steps per run. Diverged = a non-finite loss, a validation loss 1 nat above the start "
                  "(the run stops there), or a final validation loss no lower than the start. The refresh interval "
                  "is SPlus's inverse_every and SOAP's and Shampoo's precondition_frequency (Shampoo preconditions "
                  "from that step on, grafted Adam or plain momentum before).", "",
                  "| optimizer | diverged | " + " | ".join(f"largest stable lr, refresh {f}" for f in refreshes) + " |",
                  "|---|---|" + "---|" * len(refreshes)]
        for name, by_refresh in sorted(by_opt.items()):
            every = [r for f in by_refresh.values() for rs in f.values() for r in rs]
            cells = []
            for f in refreshes:
                stable = [lr for lr, rs in by_refresh.get(f, {}).items() if not any(unstable(r) for r in rs)]
                cells.append("—" if f not in by_refresh else (f"{max(stable):.3g}" if stable else "none"))
            lines.append(f"| {name} | {sum(map(unstable, every))}/{len(every)} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, by_refresh in sorted(by_opt.items()):
            lrs = sorted({lr for f in by_refresh.values() for lr in f})
            lines += [f"{name}: final validation loss (mean over seeds; div = diverged, seeds diverged/run)", "",
                      "| refresh \\ lr | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |",
                      "|---|" + "---|" * len(lrs)]
            for f in sorted(by_refresh):
                cells = []
                for lr in lrs:
                    rs = by_refresh[f].get(lr, [])
                    n_bad = sum(map(unstable, rs))
                    cells.append("" if not rs else f"div ({n_bad}/{len(rs)})" if n_bad else
                                 _fmt(*mean_std([r["final_val_loss"] for r in rs])))
                lines.append(f"| {f} | " + " | ".join(cells) + " |")
            lines.append("")
        if plots_dir is not None:
            name = _heatmaps(key, by_opt, plots_dir)
            lines += [f"![{name}](plots/{name})", ""]
    return lines


def transfer_sections(runs: list[dict], plots_dir: Path | None) -> list[str]:
    """Claim 2 of the SPlus paper: the best lr of each optimizer at each width (runs of --width), and how far it
    moves; a plot of final loss against lr, one line per width, one panel per optimizer."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in runs:
        c = r["config"]
        groups[(c["task"], c["profile"], c["start"])][variant(c)][run_width(r)][c["lr"]].append(r)
    lines = []
    for key, by_opt in sorted(groups.items()):
        widths = sorted({w for by_width in by_opt.values() for w in by_width})
        if len(widths) < 2:
            continue
        task, profile, start = key
        lines += [f"## Learning-rate transfer across width: {task} · profile {profile} · start {start}", "",
                  "Best lr (lowest mean final validation loss; its loss in brackets) at each width; shift = how many "
                  "×10^(1/3) grid steps the best lr moves from the smallest to the largest width (0: it transfers). "
                  "A best lr at the edge of the lrs run is marked (edge): the true best may lie beyond.", "",
                  "| optimizer | " + " | ".join(f"width {w}" for w in widths) + " | shift |",
                  "|---|" + "---|" * (len(widths) + 1)]
        for name, by_width in sorted(by_opt.items()):
            cells, bests = [], []
            for w in widths:
                by_lr = by_width.get(w)
                if not by_lr:
                    cells.append("")
                    continue
                lr, edge = best_lr({lr: [r["final_val_loss"] for r in rs] for lr, rs in by_lr.items()})
                loss = mean_std([r["final_val_loss"] for r in by_lr[lr]])[0]
                bests.append(lr)
                cells.append(f"{lr:.3g} ({'div' if loss == math.inf else f'{loss:.3f}'})"
                             + (" (edge)" if edge else ""))
            shift = f"{_grid_steps(bests[0], bests[-1])}" if len(bests) > 1 else "n/a"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {shift} |")
        lines.append("")
        if plots_dir is not None:
            name = _transfer_plot(key, by_opt, widths, plots_dir)
            lines += [f"![{name}](plots/{name})", ""]
    return lines


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


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def loss_range(curves: list[list[dict]]) -> tuple[float, float]:
    """The y-limits of a loss plot: every finite point of every curve inside, the first evaluation (the start)
    included, with a 3% margin on the log scale."""
    finite = [x["val_loss"] for recs in curves for x in recs if math.isfinite(x["val_loss"])]
    if not finite:
        return 0.1, 10.0
    return min(finite) * 0.97, max(finite) * 1.03


def _plots(key, best, by_opt, fractions, plots_dir: Path, clock: str = "wall",
           base_name: str | None = BASELINE) -> list[str]:
    """One figure per (task, profile, start): validation loss against steps and against seconds for each optimizer
    at its best lr (whole curves, the start included), with AdamW's final loss as a line and a marker where each
    optimizer first reaches it (the steps-to-AdamW / time-to-AdamW of the table); final loss against lr only when a
    sweep ran several lrs."""
    matplotlib, plt = _matplotlib()
    from matplotlib.ticker import FixedLocator, NullLocator

    plots_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join(key).replace("@", "")
    ckey = CLOCKS[clock]
    sweep = any(len(by_lr) > 1 for by_lr in by_opt.values())
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(18 if sweep else 12, 6))
    names = sorted(best, key=lambda n: (n != base_name, n))  # AdamW first, in C0 blue
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    base = best.get(base_name)
    target = mean_std([r["final_val_loss"] for r in base[2]])[0] if base else math.nan
    has_clock = all(ckey in x for n in names for r in best[n][2] for x in r["records"])
    totals = {"step": mean_std([r["records"][-1]["step"] for r in base[2]])[0],
              ckey: mean_std([r["records"][-1].get(ckey, math.nan) for r in base[2]])[0]} if base else {}

    lo, hi = loss_range([r["records"] for n in names for r in best[n][2]])
    xlabel = "training seconds (wall clock)" if clock == "wall" else "training CPU seconds (all threads)"
    panels = [(axes[0], "step", "step", "steps")] + ([(axes[1], ckey, xlabel, "time")] if has_clock else [])
    if not has_clock:
        axes[1].text(0.5, 0.5, f"no {clock} clock in these records", ha="center", va="center",
                     transform=axes[1].transAxes)
    for ax, xkey, xlabel, what in panels:
        for k, name in enumerate(names):
            lr, _, runs = best[name]
            for r in runs:  # one line per seed
                recs = [x for x in r["records"] if math.isfinite(x["val_loss"])]
                ax.plot([x[xkey] for x in recs], [x["val_loss"] for x in recs], color=colors[name], lw=1.6, alpha=0.85)
            frac = fractions.get(name, (math.nan, math.nan))[0 if xkey == "step" else 1]
            if name != base_name and math.isfinite(frac) and math.isfinite(target):
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
        if name == base_name or name not in fractions:
            return text
        s, t = fractions[name]
        time = f", {t:.2f}× time" if math.isfinite(t) else ""
        return text + (f": {s:.2f}× steps{time}" if math.isfinite(s) else ": never reaches AdamW")

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


def _heatmaps(key, by_opt: dict, plots_dir: Path) -> str:
    """One panel per optimizer: refresh interval (rows) x lr (columns), coloured by the final validation loss (one
    colour scale for all panels, up to the starting loss); diverged cells grey with a cross."""
    matplotlib, plt = _matplotlib()
    import numpy as np

    plots_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(by_opt)
    finals = [r["final_val_loss"] for o in by_opt.values() for f in o.values() for rs in f.values() for r in rs
              if not unstable(r)]
    starts = [r["records"][0]["val_loss"] for o in by_opt.values() for f in o.values() for rs in f.values()
              for r in rs]
    vmin = min(finals) if finals else 0.0
    vmax = max(max(finals) if finals else 1.0, _mean_finite(starts))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1, 4.2), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = None
    for ax, name in zip(axes[0], names):
        by_refresh = by_opt[name]
        refreshes = sorted(by_refresh)
        lrs = sorted({lr for f in by_refresh.values() for lr in f})
        grid = np.full((len(refreshes), len(lrs)), np.nan)
        for i, f in enumerate(refreshes):
            for j, lr in enumerate(lrs):
                rs = by_refresh[f].get(lr, [])
                if rs and not any(unstable(r) for r in rs):
                    grid[i, j] = mean_std([r["final_val_loss"] for r in rs])[0]
                if rs:
                    bad = sum(map(unstable, rs))
                    text = (f"×\n{bad}/{len(rs)}" if bad else f"{grid[i, j]:.3f}")
                    ax.text(j, i, text, ha="center", va="center", fontsize=9,
                            color="black" if bad or grid[i, j] > (vmin + vmax) / 2 else "white")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                          origin="lower")
        ax.set_xticks(range(len(lrs)), [f"{lr:.3g}" for lr in lrs], rotation=45)
        ax.set_yticks(range(len(refreshes)), [str(f) for f in refreshes])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("refresh interval (steps)")
        ax.set_title(name, fontsize=11)
    fig.colorbar(image, ax=axes[0].tolist(), label="final validation loss (× grey: diverged)")
    fig.suptitle(f"{key[0]} · {key[1]} profile · start {key[2]}: stability, refresh interval × lr", fontsize=12)
    name = f"{'-'.join(key).replace('@', '')}-stability.png"
    fig.savefig(plots_dir / name, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return name


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else 1.0


def _transfer_plot(key, by_opt: dict, widths: list[int], plots_dir: Path) -> str:
    """Final validation loss against lr, one line per width, one panel per optimizer (★: best lr at that width;
    diverged lrs not drawn)."""
    matplotlib, plt = _matplotlib()

    plots_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(by_opt)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), squeeze=False, sharey=True)
    colors = {w: matplotlib.colormaps["plasma"](0.1 + 0.75 * i / max(1, len(widths) - 1)) for i, w in enumerate(widths)}
    for ax, name in zip(axes[0], names):
        for w in widths:
            by_lr = by_opt[name].get(w)
            if not by_lr:
                continue
            lrs = sorted(by_lr)
            means = [mean_std([r["final_val_loss"] for r in by_lr[lr]])[0] for lr in lrs]
            ax.plot([lr for lr, m in zip(lrs, means) if math.isfinite(m)], [m for m in means if math.isfinite(m)],
                    "o-", color=colors[w], ms=4, label=f"width {w}")
            lr, _ = best_lr({lr: [r["final_val_loss"] for r in rs] for lr, rs in by_lr.items()})
            m = mean_std([r["final_val_loss"] for r in by_lr[lr]])[0]
            if math.isfinite(m):
                ax.plot([lr], [m], "*", color=colors[w], ms=14, mec="black", mew=0.6, zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(name, fontsize=11)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("final validation loss")
    axes[0][0].legend(fontsize=9)
    fig.suptitle(f"{key[0]} · {key[1]} profile · start {key[2]}: final loss vs lr per width (★ best)", fontsize=12)
    fig.tight_layout()
    name = f"{'-'.join(key).replace('@', '')}-transfer.png"
    fig.savefig(plots_dir / name, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return name


def write_report(root: Path, plots: bool = True, clock: str = "wall") -> Path:
    """report.md (and plots/ when ``plots``) for the finished runs under ``root``; ``clock``: "wall" or "cpu", the
    time behind time-to-AdamW and the seconds plots."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {root} (looked for */done.json)")
    plots_dir = root / "plots" if plots else None
    lines = ["# whiten-bench report", "", f"Results directory: `{root}` ({len(runs)} finished runs).", ""]
    for key, by_opt in sorted(summarize(runs).items()):
        lines += section(key, by_opt, plots_dir, clock)
    lines += stability_sections(runs, plots_dir)
    lines += transfer_sections(runs, plots_dir)
    lines += tune_sections(root, plots_dir, clock)
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tuned comparisons (whiten-bench tune): the path, the sensitivities, steps to AdamW's tuned loss, the budget axis
# ---------------------------------------------------------------------------------------------------------------

def _ci(test: dict, digits: int = 2) -> str:
    if test["n"] == 0:
        return "n/a"
    if test["mean"] == math.inf:
        return "> 1 (a seed never reached it)"
    text = f"{test['mean']:.{digits}f}"
    if math.isfinite(test["low"]):
        text += f" [{test['low']:.{digits}f}, {test['high']:.{digits}f}]"
    return text


def _verdict(test: dict) -> str:
    if test["significant"] is None:
        return "n/a (1 seed)"
    t = f"t = {test['t']:.2f}" if math.isfinite(test["t"]) else "no spread"
    return ("**yes**" if test["significant"] else "no") + (f" ({t})" if test["mean"] != math.inf else "")


def tuned_fractions(base_runs: list[dict], runs: list[dict], clock: str = "seconds") -> tuple:
    """Per seed, the steps and the time ``runs`` need to reach AdamW's final loss, as fractions of AdamW's steps and
    time: paired by seed (the target of seed s is AdamW's seed-s final loss, so both saw the same data order); a seed
    AdamW did not run is held to the mean of AdamW's seeds. Interpolated between evaluations; inf when never
    reached. AdamW against itself is 1 by definition."""
    from .metrics import crossing

    by_seed = {r["config"]["seed"]: r for r in base_runs}
    mean_target = statistics.fmean(r["final_val_loss"] for r in base_runs)
    mean_steps = statistics.fmean(r["records"][-1]["step"] for r in base_runs)
    mean_time = statistics.fmean(r["records"][-1].get(clock, math.nan) for r in base_runs)
    s, t = [], []
    for r in runs:
        b = by_seed.get(r["config"]["seed"])
        if b is not None and b["config"] == r["config"]:
            s.append(1.0)
            t.append(1.0)
            continue
        target = b["final_val_loss"] if b is not None else mean_target
        steps = b["records"][-1]["step"] if b is not None else mean_steps
        seconds = b["records"][-1].get(clock, math.nan) if b is not None else mean_time
        s.append(crossing(r["records"], target, "step") / steps)
        t.append(crossing(r["records"], target, clock) / seconds if seconds > 0 else math.nan)
    return s, t


def tune_sections(root: Path, plots_dir: Path | None, clock: str = "wall") -> list[str]:
    """Sections for the tunes under root/tune: per task and budget, each optimizer's tuned point, the steps and
    time it needs to reach AdamW's tuned final loss with a 95% interval over seeds and a one-sided t-test of
    "below 1", its path and each hyperparameter's sensitivity; then speedup against the budget."""
    from .metrics import data_equivalent_speedup, speedup_test
    from .tune import load_tunes

    tunes = load_tunes(root)
    if not tunes:
        return []
    ckey = CLOCKS[clock]
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for t in tunes:
        groups[(t["task"], t["label"])][t["steps"]][t["optimizer"]] = t
    lines = []
    for (task, label), by_steps in sorted(groups.items()):
        speedups: dict = defaultdict(dict)  # optimizer -> {steps: (steps-speedup, data-equivalent speedup)}
        adamw_curve = {s: _tuned_mean(by_opt[BASELINE], root) for s, by_opt in by_steps.items() if BASELINE in by_opt}
        for steps, by_opt in sorted(by_steps.items()):
            any_t = next(iter(by_opt.values()))
            per_param = steps * any_t["tokens_per_step"] / any_t["parameters"]
            lines += [f"## Tuned: {task} · profile {label} · {steps} steps (×{any_t['budget']:g} of {any_t['base_steps']}; "
                      f"{steps * any_t['tokens_per_step']:,} {any_t['unit']}, {per_param:.2f} per parameter)", "",
                      "Coordinate descent from the registry's setting (`whiten-bench tune`): one hyperparameter at a "
                      "time over its grid, the others at their current best, a change kept only when it lowers the "
                      "final validation loss of the first seed by more than the noise (the std over the noise seeds "
                      "at the start point, at least the floor)"
                      + (", or, where the first seed's gain was positive but within the noise, when the mean over "
                         "the noise seeds gains more than noise·√(2/n) (n seeds)"
                         if any(t.get("confirm") for t in by_opt.values()) else "")
                      + ", until a round changes nothing. The tuned point then ran every seed.", ""]
            base = by_opt.get(BASELINE)
            base_runs = _tuned_runs(base, root) if base else []
            target = statistics.fmean(r["final_val_loss"] for r in base_runs) if base_runs else math.nan
            lines += ["| optimizer | tuned setting | final val loss (seeds) | start's loss | noise | rounds | sweeps |",
                      "|---|---|---|---|---|---|---|"]
            for name, t in sorted(by_opt.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])):
                finals = [v for v in t["final"].values()]
                f_mean, f_std = mean_std(finals)
                first = next(iter(t["noise_seeds"].values()))
                changed = [f"{k} {_short(v)}" for k, v in t["point"].items() if k != "lr" and v != t["start"].get(k)]
                setting = ", ".join([f"lr {t['point']['lr']:.3g}"] + changed) + ("" if changed else " (rest as registry)")
                lines.append(f"| {name} | {setting} | {_fmt(f_mean, f_std)} ({len(finals)}) | {first:.3f} | "
                             f"{t['noise']:.4f} | {t['rounds']}{'' if t['converged'] else ' (not converged)'} | "
                             f"{len(t['path'])} |")
            lines.append("")
            if base_runs and math.isfinite(target):
                lines += [f"Steps and time ({clock} clock) to reach AdamW's tuned final loss ({target:.4f}, mean "
                          "over seeds; each seed is held to AdamW's final loss with the same seed, the same data "
                          "order), as fractions of AdamW's steps and time: mean over seeds [95% interval: mean ± "
                          "t(0.975, n-1) · s/√n]. Significant: a one-sided t-test of \"fraction < 1\" at the 5% "
                          "level, t = (mean - 1)/(s/√n) below -t(0.95, n-1) (6.31 for 2 seeds, 2.92 for 3). A seed "
                          "that never reaches the target makes the fraction > 1.", "",
                          "| optimizer | steps to AdamW | significant? | time to AdamW | significant? | speedup (1/steps) |",
                          "|---|---|---|---|---|---|"]
                for name, t in sorted(by_opt.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])):
                    runs = _tuned_runs(t, root)
                    if not runs:
                        continue
                    s, tm = tuned_fractions(base_runs, runs, ckey)
                    st, tt = speedup_test(s), speedup_test(tm)
                    inv = 1 / st["mean"] if st["mean"] and math.isfinite(st["mean"]) else math.nan
                    lines.append(f"| {name} | {_ci(st)} | {_verdict(st)} | {_ci(tt)} | {_verdict(tt)} | "
                                 f"{inv:.2f}× |" if math.isfinite(inv) else
                                 f"| {name} | {_ci(st)} | {_verdict(st)} | {_ci(tt)} | {_verdict(tt)} | < 1× |")
                    loss = _tuned_mean(t, root)
                    eq = data_equivalent_speedup(list(adamw_curve), list(adamw_curve.values()), loss, steps) \
                        if len(adamw_curve) > 1 else math.nan
                    speedups[name][steps] = (inv, eq)
                lines.append("")
            for name, t in sorted(by_opt.items()):
                lines += _path_lines(name, t)
        if len(by_steps) > 1:
            lines += _budget_lines(task, label, by_steps, speedups, plots_dir)
    return lines


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(tuple(v) if isinstance(v, list) else v)


def _tuned_runs(t: dict, root: Path) -> list[dict]:
    runs = []
    for rel in t.get("runs", {}).values():
        path = Path(root) / rel / "done.json"
        if path.exists():
            runs.append(json.loads(path.read_text()))
    return runs


def _tuned_mean(t: dict, root: Path) -> float:
    finals = list(t["final"].values())
    return statistics.fmean(finals) if finals and all(map(math.isfinite, finals)) else math.inf


def _path_lines(name: str, t: dict) -> list[str]:
    """The path the descent took (one line per coordinate sweep) and each hyperparameter's sensitivity: the loss
    range over the values its last sweep tried (diverged values counted apart)."""
    lines = [f"**{name}**: the path (first seed's final val loss per value; ✓ kept):", ""]
    last: dict = {}
    for p in t["path"]:
        cells = []
        for v, loss in p["tried"]:
            mark = " ✓" if p["accepted"] and v == p["best"] else ""
            cells.append(f"{_short(v)}: {'∞' if not math.isfinite(loss) else f'{loss:.4f}'}{mark}")
        confirmed = p.get("confirmed")
        lines.append(f"- round {p['round']}, {p['key']}: " + ", ".join(cells)
                     + ("" if p["accepted"] else f" (kept {_short(p['from'])})")
                     + ("" if not confirmed else f"; {_short(p['best'])} against {_short(p['from'])} on seeds "
                        f"{confirmed['seeds']}: mean gain {confirmed['mean_gain']:.4f}, needed "
                        f"{confirmed['threshold']:.4f}"))
        last[p["key"]] = p
    lines += ["", "Sensitivity (last sweep of each: worst minus best final loss over the values tried):", "",
              "| hyperparameter | values tried | best | loss range | diverged |", "|---|---|---|---|---|"]
    for key, p in last.items():
        losses = [loss for _, loss in p["tried"]]
        finite = [x for x in losses if math.isfinite(x)]
        spread = max(finite) - min(finite) if finite else math.nan
        lines.append(f"| {key} | {len(losses)} | {_short(min(p['tried'], key=lambda x: x[1])[0])} | {spread:.4f} | "
                     f"{len(losses) - len(finite)} |")
    return lines + [""]


def _budget_lines(task, label, by_steps, speedups, plots_dir) -> list[str]:
    steps_list = sorted(by_steps)
    lines = [f"## Speedup over AdamW against the budget: {task} · profile {label}", "",
             "Each budget tuned on its own (the first from the registry's setting, each later one from the point "
             "tuned at the budget before). Two speedups: 1/(steps to AdamW's tuned final loss), and Fantastic "
             "Pretraining Optimizers' data-equivalent one: the budget AdamW would need for the optimizer's final "
             "loss (AdamW's tuned losses interpolated in log budget) over the budget used; '—' where that loss lies "
             "outside AdamW's range (no extrapolation).", "",
             "| optimizer | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
             "|---|" + "---|" * len(steps_list)]
    for name, by in sorted(speedups.items()):
        cells = []
        for s in steps_list:
            inv, eq = by.get(s, (math.nan, math.nan))
            cells.append(("—" if not math.isfinite(inv) else f"{inv:.2f}×") + " / "
                         + ("—" if not math.isfinite(eq) else f"{eq:.2f}×"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if plots_dir is not None and speedups:
        name = _budget_plot(task, label, steps_list, speedups, plots_dir)
        lines += [f"![{name}](plots/{name})", ""]
    return lines


def _budget_plot(task, label, steps_list, speedups, plots_dir: Path) -> str:
    matplotlib, plt = _matplotlib()
    plots_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for k, (name, by) in enumerate(sorted(speedups.items())):
        color = f"C{k}"
        for i, (style, what) in enumerate((("o-", "1/steps"), ("s--", "data-equivalent"))):
            xs = [s for s in steps_list if s in by and math.isfinite(by[s][i])]
            if xs:
                ax.plot(xs, [by[s][i] for s in xs], style, color=color, label=f"{name} ({what})")
                drawn += 1
    ax.axhline(1.0, color="black", ls=":", lw=1)
    if drawn:  # a log axis with nothing on it cannot place its ticks
        ax.set_xscale("log", base=2)
    else:
        ax.text(0.5, 0.5, "no optimizer reached AdamW's loss", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training steps (budget)")
    ax.set_ylabel("speedup over tuned AdamW (1 / steps-to-AdamW)")
    ax.set_title(f"{task} · {label}: speedup vs budget, every hyperparameter tuned", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{task}-{label}-tuned-budget.png"
    fig.savefig(plots_dir / name, dpi=100)
    plt.close(fig)
    return name
