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


def fraction_to_target(records: list[dict], baseline: list[dict], target: float | None = None) -> tuple[float, float]:
    """(steps, seconds) this curve needs to reach the baseline's final loss, as fractions of the baseline's total
    steps and seconds. ``inf`` when never reached (reported as "> 1")."""
    if target is None:
        target = baseline[-1]["val_loss"]
    total_steps, total_seconds = baseline[-1]["step"], baseline[-1]["seconds"]
    s = crossing(records, target, "step")
    t = crossing(records, target, "seconds")
    return s / total_steps, (t / total_seconds if total_seconds > 0 else math.inf)


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
