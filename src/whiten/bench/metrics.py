"""Metrics on validation curves: steps-to-target and time-to-target (interpolated between evaluations), best
learning rate, mean and spread over seeds, and the significance rule."""

from __future__ import annotations

import math
import statistics


def crossing(records: list[dict], target: float, key: str = "step") -> float:
    """The first ``key`` (step or seconds) at which the validation loss reaches ``target``, interpolated linearly
    between the two evaluations around the crossing; ``inf`` if the curve never gets there."""
    prev = None
    for rec in records:
        loss = rec["val_loss"]
        if not math.isfinite(loss):
            return math.inf
        if loss <= target:
            if prev is None or prev["val_loss"] == loss:
                return float(rec[key])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - loss)
            return prev[key] + frac * (rec[key] - prev[key])
        prev = rec
    return math.inf


def fraction_to_target(records: list[dict], baseline: list[dict], target: float | None = None,
                       clock: str = "seconds") -> tuple[float, float]:
    """(steps, time) this curve needs to reach the baseline's final loss, as fractions of the baseline's total
    steps and time; ``clock`` is the time's key in the records ("seconds": wall clock, "cpu_seconds": the
    process's CPU time). ``inf`` when never reached (reported as "> 1"); NaN when the records have no such clock.

    The baseline against itself is 1 and 1 by definition: a noisy curve can dip to its own final loss before its
    last evaluation, and the first crossing would then read below 1."""
    if target is None:
        if records is baseline or records == baseline:
            return 1.0, 1.0
        target = baseline[-1]["val_loss"]
    total_steps = baseline[-1]["step"]
    s = crossing(records, target, "step")
    if any(clock not in rec for rec in records) or clock not in baseline[-1]:
        return s / total_steps, math.nan
    total_time = baseline[-1][clock]
    t = crossing(records, target, clock)
    return s / total_steps, (t / total_time if total_time > 0 else math.inf)


# A run on the CPU whose process got less than this share of the CPU time its threads could use (CPU time / (wall
# time x threads)) ran on a loaded machine, or with more threads than cores: its wall-clock numbers overstate its
# cost. Measured (a small transformer-sized MLP step, torch CPU): 1.00 on idle cores at 1, 2 and 4 threads; 0.46 for
# 2 threads on 2 cores beside two busy processes (wall time 3.8x), 0.50 for 1 thread there; 0.26 for 2 threads on
# 1 core. 0.8 flags a run whose wall time is inflated by a quarter or more.
LOADED_UTILIZATION = 0.8


def utilization(run: dict) -> float | None:
    """CPU time / (wall time x threads) of a run's timed training loop; None when it cannot be told (a run on a GPU,
    where the CPU mostly waits, or a record from before CPU time was kept)."""
    wall, cpu, threads = run.get("train_seconds", 0.0), run.get("train_cpu_seconds"), run.get("threads")
    if cpu is None or not threads or wall <= 0 or not str(run.get("device", "")).startswith("cpu"):
        return None
    return cpu / (wall * threads)


def unstable(run: dict) -> bool:
    """Divergence as the stability report counts it: a non-finite loss or a validation loss 1 nat above the start
    (the harness stops such a run), or a final validation loss no lower than the starting one."""
    if run["diverged"]:
        return True
    final, first = run["final_val_loss"], run["records"][0]["val_loss"]
    return not math.isfinite(final) or final >= first


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return math.inf, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.fmean(values), statistics.stdev(values)


def best_lr(final_by_lr: dict[float, list[float]]) -> tuple[float, bool]:
    """The lr with the lowest mean final loss, and whether it sits at an edge of the grid that was run."""
    lrs = sorted(final_by_lr)
    means = {lr: mean_std(v)[0] for lr, v in final_by_lr.items()}
    best = min(lrs, key=lambda lr: (means[lr], lr))
    return best, len(lrs) > 1 and best in (lrs[0], lrs[-1])


def significantly_lower(a: list[float], b: list[float], z: float = 2.0) -> bool | None:
    """The rule: A is better than B when mean(A) < mean(B) by more than ``z`` standard errors of the difference
    (Welch's standard error). None when either side has fewer than 2 finite values (no spread to judge by)."""
    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    diff = statistics.fmean(b) - statistics.fmean(a)
    return diff > z * se if se > 0 else diff > 0


# One-sided 95% quantiles of Student's t (df 1..30); beyond 30 the normal's 1.645 is within 2%. A table, so that
# the report needs no scipy.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
        1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)
# Two-sided 95% (the confidence interval's half-width), df 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int, two_sided: bool) -> float:
    """Student's t quantile at 95% (one-sided) or 97.5% (for a two-sided 95% interval), ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    table = _T975 if two_sided else _T95
    return table[df - 1] if df <= len(table) else (1.960 if two_sided else 1.645)


def speedup_test(fractions: list[float]) -> dict:
    """Steps (or time) to AdamW's final loss as a fraction of AdamW's, over seeds: the mean, a 95% confidence
    interval (mean ± t(0.975, n-1) · s/√n) and a one-sided t-test of "fraction < 1" (speedup > 1) at the 5% level:
    significant when (mean - 1) / (s/√n) < -t(0.95, n-1). A seed that never reaches the target counts as not
    below 1 (its fraction is infinite: no interval, not significant). Fewer than 2 seeds: no interval, no test."""
    n = len(fractions)
    out = {"n": n, "mean": math.nan, "low": math.nan, "high": math.nan, "t": math.nan, "significant": None}
    if n == 0:
        return out
    if any(not math.isfinite(f) for f in fractions):
        out.update(mean=math.inf, significant=False if n >= 2 else None)
        return out
    mean = statistics.fmean(fractions)
    out["mean"] = mean
    if n < 2:
        return out
    se = statistics.stdev(fractions) / math.sqrt(n)
    half = t_quantile(n - 1, two_sided=True) * se
    out.update(low=mean - half, high=mean + half)
    if se == 0:
        out["significant"] = mean < 1
        out["t"] = -math.inf if mean < 1 else math.inf
    else:
        out["t"] = (mean - 1) / se
        out["significant"] = out["t"] < -t_quantile(n - 1, two_sided=False)
    return out


def data_equivalent_speedup(budgets: list[float], losses: list[float], loss: float, budget: float) -> float:
    """Fantastic Pretraining Optimizers' speedup: the budget AdamW would need to reach ``loss`` (from its tuned final
    losses at ``budgets``, interpolated linearly in log budget between neighbouring budgets) divided by ``budget``.
    NaN when ``loss`` lies outside AdamW's range (no extrapolation: below AdamW's best loss the speedup is at least
    max(budgets)/budget, which the report says in words)."""
    pts = sorted((b, l) for b, l in zip(budgets, losses) if math.isfinite(l))
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        lo, hi = min(l0, l1), max(l0, l1)
        if lo <= loss <= hi and l0 != l1:
            frac = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0))) / budget
    for b, l in pts:
        if l == loss:
            return b / budget
    return math.nan
