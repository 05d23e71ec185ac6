"""The benchmark harness and the Fisher family: the registry entries, sample_fisher called on the steps the
optimizer asks for (every task: class logits for lm and vit, the mse kind for dit), inside the timed step."""

from __future__ import annotations

import math

import pytest
import torch

import whiten
from whiten.bench import registry
from whiten.bench.run import RunConfig, _train_step, run
from whiten.bench.tasks import make_task


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, "tiny") for name in ("lm", "vit", "dit")}


@pytest.mark.parametrize("name", ["lm", "vit", "dit"])
@pytest.mark.parametrize("optimizer", ["tnt", "sophia"])
def test_tiny_end_to_end_with_sampling(tasks, tmp_path, monkeypatch, name, optimizer):
    calls = []
    original = whiten.fisher.FisherMixin.sample_fisher

    def counting(self, logits, kind="ce"):
        calls.append((self.fisher_steps, kind, tuple(logits.shape)))
        return original(self, logits, kind)

    monkeypatch.setattr(whiten.fisher.FisherMixin, "sample_fisher", counting)
    spec = registry.get_spec(optimizer)
    lr = spec.lr_grid[0]  # the bottom of the grid: these runs check the harness, not the optimizer's best lr
    cfg = RunConfig(task=name, profile="tiny", optimizer=optimizer, lr=lr, seed=0, steps=12, evals=3)
    summary = run(cfg, tasks[name], tmp_path)
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    due = [0, 10] if optimizer == "tnt" else [10]  # TNT every 10 steps from 0; Sophia after 10, 20, ...
    assert [c[0] for c in calls] == due
    assert all(c[1] == ("mse" if name == "dit" else "ce") for c in calls)


def test_the_extra_backward_feeds_the_optimizer(tasks):
    """One harness step on a due step captures curvature (TNT's factors move off zero), on another it does not."""
    task = tasks["vit"]
    model = task.build_model(0)
    opt = registry.build_optimizer(registry.get_spec("tnt"), model, 1e-4, task.width)
    base = [g["lr"] for g in opt.param_groups]
    _train_step(task, model, opt, base, 1.0, task.train_batch(0, 0))
    w = next(p for p in model.parameters() if p.ndim == 2)
    assert opt.state[w]["captures"] == 1 and opt.state[w]["trace"] > 0
    _train_step(task, model, opt, base, 1.0, task.train_batch(0, 1))
    assert opt.state[w]["captures"] == 1


def test_registry_entries():
    for name in ("tnt", "sophia"):
        spec = registry.get_spec(name)
        assert spec.lr_grid[0] < spec.default_lr < spec.lr_grid[-1]
        model = make_task("lm", "tiny").build_model(0)
        opt = registry.build_optimizer(spec, model, spec.default_lr, width=32)
        assert hasattr(opt, "sample_fisher")


def test_loss_and_output_agree_with_loss(tasks):
    for name, task in tasks.items():
        model = task.build_model(0)
        batch = task.train_batch(0, 3)
        loss, out = task.loss_and_output(model, batch)
        assert torch.equal(loss, task.loss(model, batch))
        assert out.requires_grad


def _bench_ddp(rank, world, optimizer, root):
    from whiten.bench.parallel import Parallel

    task = make_task("lm", "tiny")
    lr = registry.get_spec(optimizer).lr_grid[0]
    cfg = RunConfig(task="lm", profile="tiny", optimizer=optimizer, lr=lr, seed=0, steps=12, evals=3)
    summary = run(cfg, task, root, parallel=Parallel(world=world, rank=rank, mode="ddp"))
    return summary["final_val_loss"]


@pytest.mark.parametrize("optimizer", ["tnt", "sophia"])
def test_harness_samples_on_every_rank_under_ddp(optimizer, tmp_path):
    """torchrun-style DDP (the harness's Parallel, DDP wrapper, process_group=WORLD): sample_fisher runs on every
    rank's logits through the DDP module and the ranks meet in the step's all-reduce (no hang, no error); that the
    numbers are one process's is tests/test_fisher.py's DDP test."""
    from dist_utils import launch

    losses = launch(_bench_ddp, 2, optimizer, str(tmp_path))
    assert losses[0] == losses[1] and math.isfinite(losses[0])


# ----- K-BFGS: the harness passes step() a closure that re-evaluates the batch -----------------------------------------

@pytest.mark.parametrize("name", ["lm", "vit"])
@pytest.mark.parametrize("optimizer", ["kbfgs", "kbfgs-l"])
def test_tiny_end_to_end_with_the_closure(tasks, tmp_path, monkeypatch, name, optimizer):
    """Every step of a K-BFGS run is step(closure), the closure evaluated twice (before and after the step), with
    no warning (a step without a closure, or hooks that caught nothing, would warn: warnings are errors here)."""
    import warnings

    evaluations = []
    original = whiten.KBFGS.step

    def counting(self, closure=None):
        assert closure is not None

        def counted():
            evaluations.append(self._pass)  # 1: before the step, 2: after it
            return closure()

        return original(self, counted)

    monkeypatch.setattr(whiten.KBFGS, "step", counting)
    spec = registry.get_spec(optimizer)
    cfg = RunConfig(task=name, profile="tiny", optimizer=optimizer, lr=spec.default_lr, seed=0, steps=6, evals=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        summary = run(cfg, tasks[name], tmp_path)
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert evaluations == [1, 2] * 6


def test_the_closure_step_returns_the_loss_before_the_step(tasks):
    task = tasks["lm"]
    model = task.build_model(0)
    opt = registry.build_optimizer(registry.get_spec("kbfgs"), model, 0.1, task.width)
    base = [g["lr"] for g in opt.param_groups]
    batch = task.train_batch(0, 0)
    with torch.no_grad():
        before = task.loss(model, batch)
    loss = _train_step(task, model, opt, base, 1.0, batch)
    assert torch.allclose(loss.detach(), before) and not torch.equal(task.loss(model, batch).detach(), before)
    w = model.blocks[0].fc1.weight if hasattr(model, "blocks") else next(p for p in model.parameters() if p.ndim == 2)
    assert opt.state[w]["a_updates"] == 1


def test_harness_steps_kbfgs_on_every_rank_under_ddp(tmp_path):
    """torchrun-style DDP (the harness's Parallel): every rank calls step(closure), whose second evaluation runs
    through the DDP module on every rank; the ranks end with the same validation loss."""
    from dist_utils import launch

    losses = launch(_bench_ddp, 2, "kbfgs", str(tmp_path))
    assert losses[0] == losses[1] and math.isfinite(losses[0])
