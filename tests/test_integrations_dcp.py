"""The single-process torch.distributed.checkpoint path that trainers use (get_optimizer_state_dict /
set_optimizer_state_dict, dcp.save / dcp.load): every whiten optimizer resumes bit for bit, counters and
random state included (they travel in the first param group, which DCP keeps)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import whiten
from dist_utils import load_dcp, save_dcp

VOCAB = 16
OPTIMIZERS = {
    "SPlus": lambda ps: whiten.SPlus(ps, lr=0.05, inverse_every=3),
    "SOAP": lambda ps: whiten.SOAP(ps, lr=0.01, precondition_frequency=3, ema_rate="auto"),
    "Shampoo": lambda ps: whiten.Shampoo(ps, lr=0.01, precondition_frequency=3, epsilon=1e-6),
    # a probability below 1 so the preconditioner updates depend on the saved random state
    "PSGDKron": lambda ps: whiten.PSGDKron(ps, lr=0.01, preconditioner_update_probability=0.5),
    "Muon": lambda ps: whiten.Muon(ps, lr=0.02, ema_rate=0.9),
    "ScheduleFreeAdamW": lambda ps: whiten.ScheduleFreeAdamW(ps, lr=0.01),
    # dict-valued group options (radii per role, a norm's options) travel through DCP too
    "Scion": lambda ps: whiten.Scion(ps + [{"params": [], "norm": "RowNorm", "norm_kwargs": {"transpose": True}}],
                                     lr=0.01, scale={"hidden": 2.0, "head": 8.0}, ema_rate=0.9),
    "SpecGD": lambda ps: whiten.SpecGD(ps, lr=0.02, scale="rms"),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, VOCAB))


def train(model, opt, start, stop):
    for t in range(start, stop):
        idx = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(t))
        loss = F.cross_entropy(model(idx).reshape(-1, VOCAB), idx.roll(1, 1).reshape(-1))
        if t == 3:
            loss = loss * float("nan")  # one skipped step, so the counters are not all zero
        opt.zero_grad()
        loss.backward()
        with pytest.warns(RuntimeWarning) if t == 3 else _nothing():
            opt.step()


def resume_from(name, path):
    """A fresh model and optimizer (another seed: nothing is shared by chance) loaded from the DCP files at path."""
    model = make_model(seed=1)
    opt = OPTIMIZERS[name](whiten.param_groups(model))
    load_dcp(model, opt, path)
    return model, opt


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dcp_save_load_resumes_bit_exact(name, tmp_path):
    model = make_model()
    opt = OPTIMIZERS[name](whiten.param_groups(model))
    train(model, opt, 0, 8)
    save_dcp(model, opt, tmp_path)
    counters = dict(opt.counters)
    assert counters["skipped_steps"] == 1
    train(model, opt, 8, 14)

    model2, opt2 = resume_from(name, tmp_path)
    counters2 = dict(opt2.counters)
    train(model2, opt2, 8, 14)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert counters2 == counters


@pytest.mark.parametrize("name", ["SPlus", "ScheduleFreeAdamW"])
def test_dcp_state_dict_in_eval_mode_round_trips(name):
    """get/set_optimizer_state_dict in memory, taken in eval mode (as a trainer saving after evaluation)."""
    model = make_model()
    opt = OPTIMIZERS[name](whiten.param_groups(model))
    train(model, opt, 0, 8)
    live = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    weights = copy.deepcopy(model.state_dict())
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    opt.train()
    train(model, opt, 8, 12)

    model2 = make_model(seed=1)
    model2.load_state_dict(weights)
    opt2 = OPTIMIZERS[name](whiten.param_groups(model2))
    set_optimizer_state_dict(model2, opt2, osd)
    assert opt2.in_eval_mode
    opt2.train()
    assert all(torch.equal(p, w) for p, w in zip(model2.parameters(), live))
    train(model2, opt2, 8, 12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


AVERAGING = ["SPlus", "SOAP", "Muon", "ScheduleFreeAdamW", "Scion"]


@pytest.mark.parametrize("saved_in_eval", [True, False])
@pytest.mark.parametrize("name", AVERAGING)
def test_dcp_files_saved_in_eval_mode_resume_bit_exact(name, saved_in_eval, tmp_path):
    """dcp.save / dcp.load into a fresh optimizer (train mode, so its state dict is the template DCP loads into):
    the mode and the live weights come back. They were dropped before, and training went on from the average."""
    model = make_model()
    opt = OPTIMIZERS[name](whiten.param_groups(model))
    train(model, opt, 0, 8)
    live = [p.detach().clone() for p in model.parameters()]
    if saved_in_eval:
        opt.eval()
    saved_weights = [p.detach().clone() for p in model.parameters()]  # the average in eval mode
    save_dcp(model, opt, tmp_path)
    assert all("live" not in s for s in opt.state.values()) or saved_in_eval  # saving adds nothing to the state
    opt.train()
    train(model, opt, 8, 12)

    model2, opt2 = resume_from(name, tmp_path)
    assert opt2.in_eval_mode == saved_in_eval
    assert all(torch.equal(p, w) for p, w in zip(model2.parameters(), saved_weights))  # what was scored
    if not saved_in_eval:
        assert all("live" not in s for s in opt2.state.values())  # the train-mode slot is not kept
    opt2.train()
    assert all(torch.equal(p, w) for p, w in zip(model2.parameters(), live))
    train(model2, opt2, 8, 12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
