"""Averaging semantics every trainer relies on: one eval/train convention, checkpoints in either mode that resume
exactly, no eval mode without averaging, the "auto" horizon, schedulers that keep group ratios, BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from whiten.averaging import HORIZON, average_weight
from whiten.integrations import averaged, recompute_batchnorm

FACTORIES = {
    "SPlus": lambda ps, **kw: whiten.SPlus(ps, **{"lr": 0.05, "inverse_every": 3, **kw}),
    "SOAP": lambda ps, **kw: whiten.SOAP(ps, **{"lr": 0.01, "precondition_frequency": 3, **kw}),
    "Shampoo": lambda ps, **kw: whiten.Shampoo(ps, **{"lr": 0.01, "precondition_frequency": 3, "epsilon": 1e-6,
                                                       **kw}),
    "PSGDKron": lambda ps, **kw: whiten.PSGDKron(ps, **{"lr": 0.01, **kw}),
    "Muon": lambda ps, **kw: whiten.Muon(ps, **{"lr": 0.02, **kw}),
    "ScheduleFreeAdamW": lambda ps, **kw: whiten.ScheduleFreeAdamW(ps, **{"lr": 0.01, **kw}),
}
AVERAGING = ["SPlus", "SOAP", "Shampoo", "PSGDKron", "Muon"]
VOCAB = 16


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, VOCAB))


def train(model, opt, start, stop, sched=None):
    for t in range(start, stop):
        idx = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(t))
        loss = F.cross_entropy(model(idx).reshape(-1, VOCAB), idx.roll(1, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def averaging_kwargs(name, rate):
    return {} if name == "ScheduleFreeAdamW" else {"ema_rate": rate}


@pytest.mark.parametrize("rate", ["auto", 0.9])
@pytest.mark.parametrize("name", AVERAGING + ["ScheduleFreeAdamW"])
def test_checkpoint_in_eval_mode_resumes_exactly(name, rate):
    model = make_model()
    opt = FACTORIES[name](whiten.param_groups(model), **averaging_kwargs(name, rate))
    train(model, opt, 0, 12)
    live = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert opt.in_eval_mode
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), live))
    # what a trainer saves right after evaluating: the weights it scored and the optimizer, both in eval mode
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.train()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), live))
    train(model, opt, 12, 18)

    model2 = make_model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = FACTORIES[name](whiten.param_groups(model2), **averaging_kwargs(name, rate))
    opt2.load_state_dict(saved_opt)
    assert opt2.in_eval_mode
    with pytest.raises(RuntimeError, match="eval mode"):
        opt2.step()
    opt2.train()
    assert all(torch.equal(p, w) for p, w in zip(model2.parameters(), live))
    train(model2, opt2, 12, 18)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", AVERAGING)
def test_no_averaging_means_no_eval_mode(name):
    model = make_model()
    opt = FACTORIES[name](whiten.param_groups(model), ema_rate=None)
    train(model, opt, 0, 3)
    live = [p.detach().clone() for p in model.parameters()]
    opt.eval()  # what Hugging Face's Trainer calls before evaluating
    assert not opt.in_eval_mode
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), live))
    opt.state_dict()
    train(model, opt, 3, 4)  # stepping is fine: there is nothing to be caught in
    opt.train()


@pytest.mark.parametrize("name", AVERAGING)
def test_load_state_dict_takes_the_mode_of_the_checkpoint(name):
    model = make_model()
    opt = FACTORIES[name](whiten.param_groups(model), ema_rate=0.9)
    train(model, opt, 0, 4)
    train_mode_sd = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    opt.eval()
    model.load_state_dict(weights)
    opt.load_state_dict(train_mode_sd)  # loading while in eval mode: the checkpoint's mode wins
    assert not opt.in_eval_mode
    assert all("live" not in s for s in opt.state.values())
    train(model, opt, 4, 5)


def test_splus_averages_by_default_with_the_auto_rule():
    model = make_model()
    opt = whiten.SPlus(whiten.param_groups(model), lr=0.05)
    assert all(g["ema_rate"] == "auto" for g in opt.param_groups)
    w = model[1].weight
    history = []
    lrs = [0.05] * 30 + [0.05 * (1 - k / 20) for k in range(20)]  # constant, then a linear decay to 0
    for t, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        history.append(w.detach().clone())
        train(model, opt, t, t + 1)
    # reference: avg <- avg + c_t (theta_{t-1} - avg) with c_t = min(1, 1/(0.1 t rho_t)), in float64
    avg = torch.zeros_like(w, dtype=torch.float64)
    for t, (theta, lr) in enumerate(zip(history, lrs), start=1):
        c = min(1.0, 1.0 / (HORIZON * t * lr / 0.05))
        avg += c * (theta.double() - avg)
    opt.eval()
    torch.testing.assert_close(w.detach().double(), avg, rtol=0, atol=1e-6)
    # at lr 0 the window is empty: the average is the last pre-update parameters, i.e. the live ones
    assert torch.equal(w.detach(), history[-1])
    opt.train()


def test_auto_weight_horizon():
    assert average_weight(1) == 1.0 and average_weight(10) == 1.0
    assert average_weight(1000) == pytest.approx(0.01)  # the paper's 0.999 at 10k steps has 1 - r = 1e-3 ...
    assert average_weight(10000) == pytest.approx(1e-3)  # ... reached at 10k steps
    assert average_weight(1000, lr_ratio=0.5) == pytest.approx(0.02)
    assert average_weight(1000, lr_ratio=0.0) == 1.0


@pytest.mark.parametrize("name", AVERAGING)
def test_auto_rule_available_to_every_averaging_optimizer(name):
    model = make_model()
    opt = FACTORIES[name](whiten.param_groups(model), ema_rate="auto")
    train(model, opt, 0, 30)
    live = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), live))
    opt.train()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), live))
    with pytest.raises(ValueError, match="ema_rate"):
        FACTORIES[name](whiten.param_groups(model), ema_rate="sometimes")


# ----- schedulers -------------------------------------------------------------------------------------------------

def test_writing_lr_into_every_group_keeps_muons_adamw_ratio():
    model = make_model()
    opt = whiten.Muon(whiten.param_groups(model), lr=0.02, adam_lr=3e-4)
    effective = lambda: {g["role"]: g["lr"] * g["lr_scale"] for g in opt.param_groups}  # noqa: E731
    assert effective() == pytest.approx({"hidden": 0.02, "embedding": 3e-4, "vector": 3e-4, "head": 3e-4})
    for g in opt.param_groups:  # nanoGPT's schedule
        g["lr"] = 0.01
    assert effective() == pytest.approx({"hidden": 0.01, "embedding": 1.5e-4, "vector": 1.5e-4, "head": 1.5e-4})
    # the AdamW path really steps with the scaled lr: one step from zero state moves by lr (Adam's first step)
    before = model[0].weight.detach().clone()
    train(model, opt, 0, 1)
    moved = (model[0].weight.detach() - before).abs()
    moved = moved[moved > 0]
    assert torch.allclose(moved, torch.full_like(moved, 1.5e-4), rtol=1e-3)


def test_muon_group_with_its_own_lr_keeps_it():
    model = make_model()
    groups = whiten.param_groups(model, role_options={"embedding": {"lr": 1e-3}})
    opt = whiten.Muon(groups, lr=0.02, adam_lr=3e-4)
    emb = next(g for g in opt.param_groups if g["role"] == "embedding")
    assert emb["lr"] == 1e-3 and emb["lr_scale"] == 1.0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_one_cycle_lr_cycles_momentum_of_every_group(name):
    model = make_model()
    opt = FACTORIES[name](whiten.param_groups(model))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=20, cycle_momentum=True,
                                                base_momentum=0.8, max_momentum=0.9)
    key = "betas" if "betas" in opt.defaults else "momentum"
    first = [g[key][0] if key == "betas" else g[key] for g in opt.param_groups]
    assert first == pytest.approx([0.9] * len(first))  # every group, Muon's AdamW groups included
    train(model, opt, 0, 8, sched)
    later = [g[key][0] if key == "betas" else g[key] for g in opt.param_groups]
    assert all(x < 0.9 for x in later) and len(set(later)) == 1
    assert len({g["lr"] for g in opt.param_groups}) == 1


def test_muon_adamw_path_uses_the_cycled_momentum():
    w = torch.zeros(3, requires_grad=True)  # a vector: AdamW path
    opt = whiten.Muon([w], lr=0.02, adam_lr=0.01)
    assert opt.param_groups[0]["momentum"] == 0.9  # adam_betas[0]
    ref_w = w.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([ref_w], lr=0.01, betas=(0.7, 0.95), eps=1e-10, weight_decay=0.0)
    opt.param_groups[0]["momentum"] = 0.7
    for t in range(3):
        g = torch.randn(3, generator=torch.Generator().manual_seed(t))
        w.grad, ref_w.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-9)


# ----- BatchNorm -------------------------------------------------------------------------------------------------

def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def bn_batches():
    return [torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(100 + k)) for k in range(3)]


def train_bn(model, opt, steps):
    for t in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(t)) * 2 + 1
        y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_eval_leaves_batchnorm_statistics_alone():
    model = bn_model()
    opt = whiten.SPlus(whiten.param_groups(model), lr=0.1, ema_rate=0.9)
    train_bn(model, opt, 10)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    opt.eval()
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())  # documented: not averaged
    opt.train()


def test_averaged_recomputes_batchnorm_for_the_averaged_weights_and_restores_everything():
    model = bn_model()
    opt = whiten.SPlus(whiten.param_groups(model), lr=0.1, ema_rate=0.9)
    train_bn(model, opt, 10)
    live = copy.deepcopy(model.state_dict())
    with averaged(opt, model, batchnorm_batches=bn_batches()):
        # the statistics are those torch's SWA utility computes for the same (averaged) weights
        twin = copy.deepcopy(model)
        for m in twin.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        torch.optim.swa_utils.update_bn(bn_batches(), twin)
        bn, twin_bn = model[1], twin[1]
        torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)
        torch.testing.assert_close(bn.running_var, twin_bn.running_var)
        assert not torch.equal(bn.running_mean, live["1.running_mean"])
        assert not torch.equal(model[0].weight, live["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert not opt.in_eval_mode
    assert model[1].momentum == 0.1


def test_recompute_batchnorm_without_batchnorm_is_a_no_op():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    recompute_batchnorm(model, [torch.zeros(2, 3, dtype=torch.long)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
