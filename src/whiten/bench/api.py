"""The benchmark's protocol on your own model, data and loss, from Python:

    from whiten.bench import api

    task = api.UserTask(model_factory=lambda: MyNet(), batches=lambda seed: my_loader(seed), loss_fn=my_loss,
                        val_batches=my_val_batches, name="mynet")
    api.compare(task, ["adamw", "splus"], steps=500, out="results/mynet")
    api.sweep(task, ["adamw", "splus"], steps=500, seeds=(0, 1), out="results/mynet")
    api.tune(task, ["adamw", "splus"], steps=500, budgets=(1, 2), out="results/mynet-tune")
    print(api.report("results/mynet").read_text())

The same harness as whiten-bench: every optimizer gets the same initial weights (``model_factory`` is called after
``torch.manual_seed(seed)``), the same batches in the same order (``batches(seed)``), the same validation set, the
same warm-up and lr schedule; results are folders of ``done.json`` records, resumable, and the same report.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = ["UserTask", "compare", "sweep", "tune", "report"]


class UserTask:
    """A task made of your own pieces.

    ``model_factory()``: a new model (called after ``torch.manual_seed(seed)``, so each seed has its own weights and
    every optimizer gets the same). ``batches(seed)``: an iterable of training batches in the order of that seed
    (started again when it runs out); or a plain iterable (a list, a DataLoader without shuffling) for every seed.
    ``loss_fn(model, batch)``: the scalar loss; it may return ``(loss, output)`` with the model's output (class
    logits in the last dimension), which the Fisher-family optimizers (tnt, sophia, the ``-sampled`` K-FACs) need to
    sample labels from. ``val_batches``: the fixed validation set (a list of batches), evaluated with ``loss_fn``.
    ``name`` names the result folders and is part of every run's identity, with the validation set's contents:
    give another name for other training data. ``width``: the model's hidden width, for the options that depend
    on it (SPlus's derived constant; default: the most common size of the 2-D parameters' dimensions)."""

    profile_name = "custom"
    fisher_kind = "ce"

    def __init__(self, model_factory: Callable[[], torch.nn.Module], batches, loss_fn: Callable, val_batches: list,
                 name: str = "custom", width: int | None = None, device: str | torch.device = "cpu"):
        if not callable(model_factory):
            raise TypeError("model_factory must be callable: model_factory() -> torch.nn.Module")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(model, batch) -> loss or (loss, output)")
        if not callable(batches) and not isinstance(batches, Iterable):
            raise TypeError("batches must be batches(seed) -> iterable of batches, or an iterable of batches")
        val_batches = list(val_batches)
        if not val_batches:
            raise ValueError("val_batches is empty: give the fixed validation set as a list of batches")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"name {name!r}: letters, digits, '-', '_' and '.' only (it names folders)")
        self.name = name
        self.device = torch.device(device)
        self._model_factory, self._batches, self._loss_fn = model_factory, batches, loss_fn
        self.val_batches = val_batches
        self._iters: dict = {}
        probe = self._build(0)
        self.parameter_count = sum(p.numel() for p in probe.parameters())
        self.config = {"width": int(width) if width else _width(probe), "parameters": self.parameter_count}
        self._model_name = type(probe).__name__

    @property
    def width(self) -> int:
        return self.config["width"]

    @property
    def label(self) -> str:
        return self.profile_name

    def _build(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = self._model_factory()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model_factory() returned {type(model).__name__}, not a torch.nn.Module")
        return model.to(self.device)

    def build_model(self, seed: int) -> torch.nn.Module:
        return self._build(seed)

    def with_width(self, width):
        if width is not None and width != self.width:
            raise ValueError("a UserTask has one model: build another task for another width")
        return self

    def describe(self) -> dict:
        return {"task": self.name, "profile": self.profile_name, **self.config,
                "loss_fn": getattr(self._loss_fn, "__qualname__", repr(self._loss_fn)),
                "model": self._model_name}

    def data_record(self) -> dict:
        return {"val_batches": len(self.val_batches)}

    def note(self):
        return None

    def _stream(self, seed: int):
        source = self._batches(seed) if callable(self._batches) else self._batches
        return iter(source)

    def train_batch(self, seed: int, step: int):
        """Batch ``step`` of seed ``seed``'s order (the iterable is read in order, again from its start when it runs
        out or when an earlier step is asked for)."""
        it, at = self._iters.get(seed, (None, math.inf))
        if step < at:
            it, at = self._stream(seed), 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                it = self._stream(seed)
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError(f"batches({seed}) gave no batches") from None
            if at == step:
                self._iters[seed] = (it, at + 1)
                return batch
            at += 1

    def loss_and_output(self, model, batch):
        out = self._loss_fn(model, batch)
        if isinstance(out, tuple):
            return out[0], out[1]
        raise ValueError("this optimizer samples labels from the model's output (the Fisher family): loss_fn must "
                         "return (loss, output), output the class logits in its last dimension")

    def loss(self, model, batch):
        out = self._loss_fn(model, batch)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        total = 0.0
        for batch in self.val_batches:
            total += float(self.loss(model, batch))
        return {"val_loss": total / len(self.val_batches)}

    @property
    def _data_sha256(self) -> str:
        """The validation set's contents and the task's name (the training stream cannot be hashed without reading
        it all)."""
        h = hashlib.sha256(self.name.encode())
        for batch in self.val_batches:
            for t in (batch if isinstance(batch, (tuple, list)) else [batch]):
                if isinstance(t, torch.Tensor):
                    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _width(model: torch.nn.Module) -> int:
    dims = [d for p in model.parameters() if p.ndim == 2 for d in p.shape]
    if not dims:
        return 1
    return max(set(dims), key=lambda d: (dims.count(d), d))


def _configs(task: UserTask, names, lrs_for, steps: int, seeds, **fields):
    from .run import RunConfig

    return [RunConfig(task=task.name, profile=task.profile_name, optimizer=name, lr=lr, seed=seed, steps=steps,
                      **fields)
            for seed in seeds for name in names for lr in lrs_for(name)]


def _run_all(task, configs, out: Path, plots: bool, log) -> Path:
    from .report import write_report
    from .run import run
    from .sweep import sweep_lock

    out = Path(out)
    with sweep_lock(out, True):
        for cfg in configs:
            summary = run(cfg, task, out)
            status = "diverged" if summary["diverged"] else f"final val loss {summary['final_val_loss']:.4f}"
            log(f"{cfg.variant():24s} lr {cfg.lr:<8.3g} seed {cfg.seed} {status}")
    return write_report(out, plots=plots)


def _check(names):
    from .registry import get_spec

    for name in names:
        get_spec(name)  # ValueError naming the known optimizers
    return list(names)


def compare(task: UserTask, optimizers=("adamw", "splus"), steps: int = 1000, seeds=(0,), out="results/compare",
            plots: bool = False, log=print, **fields) -> Path:
    """Each optimizer at its default lr (registry.task_default: a task of yours has no tuned setting, so each
    default is named as not tuned on it); returns the report's path. ``fields``: other RunConfig fields (warmup,
    schedule, evals, start)."""
    from .registry import task_default
    from .sweep import compare_notes

    names = _check(optimizers)
    for line in compare_notes(names, task.name):
        log(f"note: {line}")
    return _run_all(task, _configs(task, names, lambda n: [task_default(n, task.name)[0]], steps, seeds, **fields),
                    out, plots, log)


def sweep(task: UserTask, optimizers=("adamw", "splus"), steps: int = 1000, seeds=(0,), lrs: dict | None = None,
          out="results/sweep", plots: bool = False, log=print, **fields) -> Path:
    """Each optimizer over its lr grid (``lrs``: {optimizer: [lr, ...]} over the registry's grids); finished runs
    are reused. Returns the report's path."""
    from .registry import get_spec

    names = _check(optimizers)
    grid = lambda n: list((lrs or {}).get(n) or get_spec(n).lr_grid)  # noqa: E731
    return _run_all(task, _configs(task, names, grid, steps, seeds, **fields), out, plots, log)


def tune(task: UserTask, optimizers=("adamw", "splus"), steps: int = 1000, budgets=(1,), space: dict | None = None,
         seeds=(0, 1), noise_seeds=None, noise_floor: float | None = None, max_rounds: int = 3,
         full_grid: bool = False, confirm: bool = True, out="results/tune", plots: bool = False, log=print,
         **fields) -> Path:
    """Coordinate descent over every hyperparameter of each optimizer (whiten.bench.tune), at each budget (multiples
    of ``steps``); ``space``: {optimizer: {hyperparameter: grid}} over the registry's; ``confirm``: borderline gains
    decided on every noise seed (see whiten.bench.tune). Returns the report's path."""
    from .report import write_report
    from .sweep import sweep_lock
    from .tune import NOISE_FLOOR, tune_runs

    names = _check(optimizers)
    out = Path(out)
    with sweep_lock(out, True):
        tune_runs(task, names, steps, list(budgets), out, spaces=space, seeds=seeds, noise_seeds=noise_seeds,
                  noise_floor=NOISE_FLOOR if noise_floor is None else noise_floor, max_rounds=max_rounds,
                  radius=None if full_grid else 1, run_fields=fields, confirm=confirm, log=log)
    return write_report(out, plots=plots)


def report(out, plots: bool = False, clock: str = "wall") -> Path:
    """The report (report.md; plots/ when ``plots``) of a results folder; returns its path."""
    from .report import write_report

    return write_report(Path(out), plots=plots, clock=clock)
