"""Coordinate descent over an optimizer's hyperparameters (the protocol of "Fantastic Pretraining Optimizers"):
start from the registry's setting, sweep one hyperparameter over its grid with the others at their current best,
take the best value when it lowers the final validation loss by more than the seed noise, and repeat over all of
them until a whole round changes nothing.

The noise: the standard deviation of the final validation loss over the noise seeds (two by default) at the
starting point, never below a stated floor (``noise_floor``). The sweeps themselves run the first seed only: every
point of a sweep sees the same data in the same order, so their differences are paired. A best value that beats
the current one on the first seed, but by no more than the noise, is confirmed (``confirm``, the default): it and
the current value run every noise seed, and it is kept when its mean loss is lower by more than the standard error
of a difference of two such means, noise·√(2/n) for n seeds. One seed decides the clear cases; the borderline ones
are decided on all of them, instead of being dropped because two seeds at a poor start point disagreed. The tuned
point then runs every seed of ``seeds``, and the report gives its mean and spread.

A point is an ordinary run (:class:`RunConfig`): the lr is its ``lr``, the warm-up its ``warmup``, the rest its
``options``, of which only those that differ from the registry's setting are written, so the starting point is the
same run as a ``sweep`` at the default lr (and reused). Runs are found again by identity (which holds every
hyperparameter), so an interrupted tune resumes where it stopped: the same decisions replay from finished runs.
Each tune writes ``tune/<task>-<profile>-<optimizer>-<steps>.json`` (the path, the noise, the tuned point); its
runs are under ``<steps>steps/`` (see :func:`run_root`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .registry import get_spec, option_default, search_space

DEFAULT_WARMUP = 0.05  # the harness's warm-up (RunConfig.warmup = -1): 5% of the steps
NOISE_FLOOR = 0.002  # nats: the smallest seed noise a tune assumes (two seeds can agree by chance)
_INDEXED = re.compile(r"^([A-Za-z_]\w*)\[(\d+)\]$")


@dataclass
class Param:
    key: str
    grid: tuple
    start: object


def _plain(value):
    """JSON lists as tuples (options are compared and hashed as tuples)."""
    return tuple(_plain(v) for v in value) if isinstance(value, list) else value


def resolve_space(name: str, space: dict | None = None) -> list[Param]:
    """The hyperparameters to tune for optimizer ``name``: the registry's space (see registry.SEARCH_SPACES) with
    ``space`` over it. ``space`` maps a key to a grid (a list), or to {"grid": [...], "start": value}, or to None
    (drop that key). Each grid is made to hold its start. ValueError names a bad key or grid."""
    spec = get_spec(name)
    merged: dict = dict(search_space(name))
    for key, value in (space or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    params = []
    for key, value in merged.items():
        start = None
        if isinstance(value, dict):
            unknown = set(value) - {"grid", "start"}
            if unknown or "grid" not in value:
                raise ValueError(f"space {key!r}: expected a list or {{'grid': [...], 'start': value}}, got {value!r}")
            start, value = _plain(value.get("start")), value["grid"]
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ValueError(f"space {key!r}: the grid must be a non-empty list, got {value!r}")
        grid = tuple(_plain(v) for v in value)
        if start is None:
            start = _start(spec, key)
        if key == "lr" and not all(isinstance(v, (int, float)) and v > 0 for v in grid):
            raise ValueError(f"space 'lr': every lr must be a positive number, got {list(grid)}")
        if key == "warmup" and not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in grid):
            raise ValueError(f"space 'warmup': fractions of the run in [0, 1), got {list(grid)}")
        if start not in grid:
            grid = tuple(sorted(grid + (start,))) if _numeric(grid + (start,)) else grid + (start,)
        params.append(Param(key, grid, start))
    return params


def _start(spec, key: str):
    if key == "lr":
        return spec.default_lr
    if key == "warmup":
        return DEFAULT_WARMUP
    m = _INDEXED.match(key)
    base = m.group(1) if m else key
    value = option_default(spec, base)
    if m:
        if not isinstance(value, (tuple, list)) or int(m.group(2)) >= len(value):
            raise ValueError(f"space {key!r}: {spec.name}'s {base} is {value!r}, which has no element {m.group(2)}")
        return value[int(m.group(2))]
    return value


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def run_config(name: str, point: dict, steps: int, seed: int, **run_fields):
    """The :class:`RunConfig` of a point: only the options that differ from the registry's setting are written (so
    the registry's own point is the plain run a sweep makes)."""
    from .run import RunConfig

    spec = get_spec(name)
    warmup_frac = point.get("warmup", DEFAULT_WARMUP)
    warmup = -1 if warmup_frac == DEFAULT_WARMUP else int(round(warmup_frac * steps))
    options: dict = {}
    for key, value in point.items():
        if key in ("lr", "warmup"):
            continue
        m = _INDEXED.match(key)
        if m:
            base, i = m.group(1), int(m.group(2))
            full = list(options.get(base, option_default(spec, base)))
            full[i] = value
            options[base] = tuple(full)
        else:
            options[key] = value
    options = {k: v for k, v in options.items() if v != option_default(spec, k)}
    return RunConfig(optimizer=name, lr=float(point["lr"]), seed=seed, steps=steps, warmup=warmup,
                     options=tuple(sorted(options.items())), **run_fields)


def describe_point(point: dict, start: dict) -> str:
    """The point as "lr 0.01, weight_decay 0.2" (the lr always; the rest where they differ from the start)."""
    parts = [f"lr {point['lr']:.3g}"] + [f"{k} {v}" for k, v in point.items() if k != "lr" and v != start.get(k)]
    return ", ".join(parts)


@dataclass
class TuneResult:
    optimizer: str
    steps: int
    start: dict  # the registry's setting
    point: dict
    noise: float
    noise_seeds: dict  # seed -> final loss at the start point
    final: dict  # seed -> final loss at the tuned point
    path: list = field(default_factory=list)  # one record per coordinate sweep
    rounds: int = 0
    converged: bool = False
    began: dict = field(default_factory=dict)  # where the descent began (the registry's, or an earlier budget's)
    confirm: bool = True  # whether borderline gains were decided on every noise seed (see coordinate_descent)

    def to_json(self) -> dict:
        return {"optimizer": self.optimizer, "steps": self.steps, "start": self.start, "began": self.began,
                "point": self.point,
                "noise": self.noise, "noise_seeds": self.noise_seeds, "final": self.final, "path": self.path,
                "rounds": self.rounds, "converged": self.converged, "noise_floor": NOISE_FLOOR,
                "confirm": self.confirm}


def _loss(summary: dict) -> float:
    return math.inf if summary["diverged"] else summary["final_val_loss"]


def coordinate_descent(name: str, evaluate, steps: int, params: list[Param], seeds=(0, 1), noise_seeds=None,
                       noise_floor: float = NOISE_FLOOR, max_rounds: int = 3, radius: int | None = 1,
                       start: dict | None = None, confirm: bool = True, log=print) -> TuneResult:
    """Tune optimizer ``name`` over ``params``. ``evaluate(point, seed) -> summary`` runs (or finds) one run.

    A sweep of a numeric hyperparameter tries the grid values within ``radius`` places of the current one and walks
    on while the best is at the edge of what was tried (None: the whole grid); other grids are tried whole. A value
    replaces the current one only when its loss is lower by more than the noise, or (``confirm``) when a smaller
    gain holds on the mean over the noise seeds by more than noise·√(2/n) (see the module's docstring). Rounds
    repeat until one changes nothing (converged) or ``max_rounds`` have run."""
    seeds = list(seeds)
    noise_seeds = list(noise_seeds) if noise_seeds is not None else seeds[:2]
    first = seeds[0]
    point = dict(start) if start is not None else {p.key: p.start for p in params}
    begin = dict(point)
    registry_start = {p.key: p.start for p in params}
    cache: dict = {}

    def loss(pt: dict, seed: int) -> float:
        key = (json.dumps(pt, sort_keys=True, default=repr), seed)
        if key not in cache:
            cache[key] = _loss(evaluate(pt, seed))
        return cache[key]

    at_start = {s: loss(point, s) for s in dict.fromkeys([first, *noise_seeds])}
    finite = [at_start[s] for s in noise_seeds if math.isfinite(at_start[s])]
    spread = statistics.stdev(finite) if len(finite) >= 2 else 0.0
    noise = max(noise_floor, spread)
    log(f"{name}: start {describe_point(point, registry_start)}: loss {at_start[first]:.4f}; noise {noise:.4f} "
        f"(std over seeds {noise_seeds} {spread:.4f}, floor {noise_floor})")
    result = TuneResult(name, steps, registry_start, point, noise, {str(s): at_start[s] for s in noise_seeds}, {},
                        began=begin, confirm=confirm)
    confirm_seeds = list(dict.fromkeys([first, *noise_seeds]))

    def mean_loss(pt: dict) -> float:
        losses = [loss(pt, s) for s in confirm_seeds]
        return statistics.fmean(losses) if all(map(math.isfinite, losses)) else math.inf
    for rnd in range(1, max_rounds + 1):
        changed = False
        for p in params:
            current = point[p.key]
            tried = _sweep(p, current, lambda v: loss({**point, p.key: v}, first), radius)
            best = min(tried, key=lambda v: (tried[v], v != current))
            gain = tried[current] - tried[best]
            accept = best != current and gain > noise
            record = {"round": rnd, "key": p.key, "tried": [[v, tried[v]] for v in tried],
                      "from": current, "best": best, "gain": gain, "accepted": accept}
            note = ""
            if confirm and best != current and 0 < gain <= noise and len(confirm_seeds) > 1:
                mean_gain = mean_loss({**point, p.key: current}) - mean_loss({**point, p.key: best})
                threshold = noise * math.sqrt(2 / len(confirm_seeds))
                accept = record["accepted"] = mean_gain > threshold  # inf - inf is nan: not kept
                record["confirmed"] = {"seeds": confirm_seeds, "mean_gain": mean_gain, "threshold": threshold}
                note = (f" (on seeds {confirm_seeds}: mean gain {mean_gain:.4f} against {threshold:.4f})")
            result.path.append(record)
            log(f"  round {rnd} {p.key}: " + ", ".join(f"{v}: {tried[v]:.4f}" for v in tried)
                + (f" -> {best} (-{gain:.4f})" if accept else f" -> keep {current}") + note)
            if accept:
                point[p.key] = best
                changed = True
        result.rounds = rnd
        if not changed:
            result.converged = True
            break
    result.point = dict(point)
    result.final = {str(s): loss(point, s) for s in seeds}
    return result


def _sweep(p: Param, current, loss_of, radius: int | None) -> dict:
    """{value: loss} over the values of ``p``'s grid the sweep tries (see :func:`coordinate_descent`)."""
    grid = list(p.grid)
    if current not in grid:
        grid = sorted(grid + [current]) if _numeric(grid + [current]) else grid + [current]
    if radius is None or not _numeric(grid):
        return {v: loss_of(v) for v in grid}
    i = grid.index(current)
    lo, hi = max(0, i - radius), min(len(grid) - 1, i + radius)
    tried = {grid[j]: loss_of(grid[j]) for j in range(lo, hi + 1)}
    while True:  # walk on while the best is at an edge of what was tried and the grid goes on
        best = min(tried, key=lambda v: (tried[v], v != current))
        if best == grid[lo] and lo > 0 and math.isfinite(tried[best]):
            lo -= 1
            tried[grid[lo]] = loss_of(grid[lo])
        elif best == grid[hi] and hi < len(grid) - 1 and math.isfinite(tried[best]):
            hi += 1
            tried[grid[hi]] = loss_of(grid[hi])
        else:
            break
    return dict(sorted(tried.items()))


def run_root(root: Path, cfg) -> Path:
    """Where a tune keeps a run: ``root/<steps>steps`` (and ``-warmup<N>`` for a warm-up other than the harness's),
    since a run's folder (RunConfig.run_dir) names neither its steps nor its warm-up. A sweep or compare with
    ``--out root/<steps>steps`` and the same settings makes the same runs."""
    return Path(root) / (f"{cfg.steps}steps" + (f"-warmup{cfg.warmup}" if cfg.warmup != -1 else ""))


def tune_path(root: Path, task_label: str, task: str, name: str, steps: int) -> Path:
    return Path(root) / "tune" / f"{task}-{task_label}-{name.replace(':', '-')}-{steps}.json"


def _dir(root: Path, cfg) -> Path:
    return cfg.run_dir(run_root(root, cfg)).relative_to(root)


def load_tunes(root: Path) -> list[dict]:
    out = []
    for path in sorted((Path(root) / "tune").glob("*.json")):
        out.append(json.loads(path.read_text()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running tunes: one optimizer at one budget, or several at several budgets
# ---------------------------------------------------------------------------------------------------------------

def budget_info(task) -> dict:
    """What the budget axis is measured in: parameters of the task's model and tokens (lm) or examples per step."""
    model = task.build_model(0)
    params = sum(p.numel() for p in model.parameters())
    cfg = task.config
    per_step = cfg.get("batch_size", 1) * cfg.get("ctx", 1)
    unit = "tokens" if "ctx" in cfg else "examples" if "batch_size" in cfg else "batches"
    return {"parameters": params, "tokens_per_step": per_step, "unit": unit}


def tune_runs(task, names: list[str], base_steps: int, budgets: list[float], root: Path, *, spaces: dict | None = None,
              seeds=(0, 1), noise_seeds=None, noise_floor: float = NOISE_FLOOR, max_rounds: int = 3,
              radius: int | None = 1, run_fields: dict | None = None, runner=None, confirm: bool = True,
              log=print) -> list[TuneResult]:
    """Tune every optimizer of ``names`` at every budget (``base_steps`` × each of ``budgets``, in that order); the
    first budget starts from the registry's setting, each later one from the point tuned at the budget before (the
    best point moves little with the budget, and the descent still tries every neighbour). ``spaces``:
    {optimizer: space} over the registry's (see :func:`resolve_space`). ``runner(cfg) -> summary`` runs one run
    (default: :func:`whiten.bench.run.run` on ``task`` into ``root``). Writes one JSON per tune under root/tune."""
    from .run import run

    root = Path(root)
    fields = {"task": task.name, "profile": task.profile_name, **(run_fields or {})}
    runner = runner or (lambda cfg: run(cfg, task, run_root(root, cfg)))
    info = budget_info(task)
    results = []
    previous: dict = {}
    for multiple in budgets:
        steps = int(round(base_steps * multiple))
        if steps < 1:
            raise ValueError(f"budget {multiple} x {base_steps} steps is under one step")
        for name in names:
            params = resolve_space(name, (spaces or {}).get(name))
            start = previous.get(name)
            if start is not None:  # a key the space no longer has, or a new one: the registry's start
                start = {p.key: start.get(p.key, p.start) for p in params}

            def evaluate(point, seed, name=name, steps=steps):
                return runner(run_config(name, point, steps, seed, **fields))

            log(f"tune {name} at {steps} steps ({multiple:g} x {base_steps}): "
                + ", ".join(f"{p.key} {list(p.grid)}" for p in params))
            res = coordinate_descent(name, evaluate, steps, params, seeds=seeds, noise_seeds=noise_seeds,
                                     noise_floor=noise_floor, max_rounds=max_rounds, radius=radius, start=start,
                                     confirm=confirm, log=log)
            record = res.to_json()
            record.update(task=task.name, label=task.label, budget=multiple, base_steps=base_steps, **info,
                          runs={str(s): str(_dir(root, run_config(name, res.point, steps, s, **fields)))
                                for s in seeds},
                          radius=radius, max_rounds=max_rounds)
            path = tune_path(root, task.label, task.name, name, steps)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1, default=repr))
            previous[name] = res.point
            results.append(res)
            mean = statistics.fmean(res.final.values()) if all(map(math.isfinite, res.final.values())) else math.inf
            log(f"{name} tuned at {steps} steps: {describe_point(res.point, res.start)}; final loss {mean:.4f} over "
                f"seeds {list(res.final)} ({'converged' if res.converged else f'stopped after {res.rounds} rounds'})")
    return results
