"""load_state_dict refuses, before changing anything, a checkpoint of another optimizer or another model, or
hyperparameters the constructor would refuse; DCP-style dicts (counters in the first param group) round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

import whiten
from state_checks import assert_same_state
from test_suite import OPTIMIZERS, build, make_model, train

ALL = list(OPTIMIZERS)


def trained(name, **kw):
    model = make_model()
    opt = build(name, model, **kw)
    train(model, opt, 0, 4)
    return model, opt


def snapshot(opt):
    return {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for p, s in opt.state.items()}, [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def assert_refused(opt, sd, match):
    """load_state_dict(sd) raises a ValueError matching ``match`` and leaves the optimizer as it was."""
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


def assert_unchanged(opt, before):
    state, groups = before
    assert set(state) == set(opt.state)
    for p in state:
        assert_same_state(state[p], opt.state[p])
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize("name", ALL)
def test_another_optimizers_checkpoint_is_refused(name):
    other = "SOAP" if name != "SOAP" else "SPlus"
    _, source = trained(other)
    _, opt = trained(name)
    assert_refused(opt, source.state_dict(), f"{other}'s, not a {name}'s")


@pytest.mark.parametrize("name", ALL)
def test_another_models_checkpoint_is_refused(name):
    _, opt = trained(name)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live state dicts
    pid = next(pid for pid, s in sd["state"].items() if any(k in s for k in opt.PARAMETER_SHAPED))
    key = next(k for k in sd["state"][pid] if k in opt.PARAMETER_SHAPED)
    sd["state"][pid][key] = torch.zeros(3, 3, 3)
    assert_refused(opt, sd, "another model")


@pytest.mark.parametrize("name", ALL)
def test_bad_saved_hyperparameters_are_refused(name):
    _, opt = trained(name)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live state dicts
    sd["param_groups"][1]["lr"] = -1.0
    assert_refused(opt, sd, "group 1 of the checkpoint: Invalid lr")


def test_non_finite_saved_state_is_refused():
    _, opt = trained("SPlus")
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live state dicts
    pid = next(iter(sd["state"]))
    sd["state"][pid]["momentum"] = torch.full_like(sd["state"][pid]["momentum"], float("nan"))
    assert_refused(opt, sd, "not finite")


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_keeps_counters(name):
    model, opt = trained(name)
    opt.counters["skipped_steps"] = 3
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live state dicts
    assert sd["param_groups"][0]["whiten_counters"]["skipped_steps"] == 3
    fresh = build(name, model)
    fresh.load_state_dict(sd)
    assert fresh.counters["skipped_steps"] == 3
    assert all("whiten_counters" not in g and "whiten_optimizer" not in g for g in fresh.param_groups)
