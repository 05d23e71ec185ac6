"""The fault campaign of issue 11, run for every optimizer of the suite's registry (a new optimizer inherits it):
a huge finite gradient spike, empty and one-element parameters, out-of-range hyperparameters, duplicated
parameters, and checkpoints that must load all or nothing; and those of issue 24: one gradient stepped again and
again, and a non-finite forward given to sample_fisher (every optimizer that has it)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from test_suite import ALL, OPTIMIZERS, build


def float_state(opt):
    return {(id(p), k): v for p, s in opt.state.items() for k, v in s.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def bases(opt):
    return {key: v.clone() for key, v in float_state(opt).items() if key[1].startswith(("basis_", "root_"))}


@pytest.mark.parametrize("name", ALL)
def test_one_finite_spike_is_recovered(name):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 6))
    opt = OPTIMIZERS[name]([p])
    snapshots = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(60):
            p.grad = torch.randn(8, 6) * (1e20 if t == 5 else 1.0)
            opt.step()
            if t in (30, 59):
                snapshots[t] = bases(opt)
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(v).all() for v in float_state(opt).values())
    assert opt.counters["eigh_failures"] == 0  # no refresh failed: the overflowed factors were restarted
    if snapshots[59]:  # refreshed optimizers: the basis/root still moves after the spike
        # Conda accumulates no factor: its basis is the SVD of the momentum, which a 1e20 gradient does not
        # overflow in float32 (its second moment, (1-β2)·g² ≈ 1e37, does not either), so nothing needs a restart
        if name != "Conda":
            assert opt.counters["factor_restarts"] >= 1
        assert any(not torch.equal(snapshots[30][k], snapshots[59][k]) for k in snapshots[59])


@pytest.mark.parametrize("name", ["SPlus", "SOAP", "Shampoo"])
def test_spike_costs_at_most_one_refresh_period(name):
    """The refresh after the spike restarts the factor and keeps a finite basis; the one after is a new basis."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 6))
    period = {"SPlus": dict(inverse_every=10), "SOAP": dict(precondition_frequency=10),
              "Shampoo": dict(precondition_frequency=10)}[name]
    opt = OPTIMIZERS[name]([p], **period)
    seen = {}
    with pytest.warns(RuntimeWarning, match="restarted"):
        for t in range(1, 23):  # step t
            p.grad = torch.randn(8, 6) * (1e20 if t == 5 else 1.0)
            opt.step()
            seen[t] = bases(opt)
    assert all(torch.isfinite(v).all() for v in seen[11].values())
    assert opt.counters["factor_restarts"] >= 1 and opt.counters["eigh_failures"] == 0
    assert any(not torch.equal(seen[11][k], seen[22][k]) for k in seen[22])  # refreshed at step 20


@pytest.mark.parametrize("name", ALL)
def test_a_spike_does_not_freeze_vectors_and_adam_paths(name):
    """A vector (Adam-style paths: Muon's AdamW, Schedule-Free, grafting) keeps moving after a 1e20 gradient: an
    overflowed second moment restarts instead of dividing every later step by inf."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16))
    opt = OPTIMIZERS[name]([p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(40):
            p.grad = torch.randn(16) * (1e30 if t == 5 else 1.0)  # squares overflow in float32 for any beta2
            opt.step()
            if t == 30:
                before = p.detach().clone()
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(v).all() for v in float_state(opt).values())
    assert (p.detach() != before).all()  # every entry still moves


def blocks(width=16, depth=6):
    """Linear + LayerNorm blocks: the model of the repeated-gradient fault (issue 24)."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth)])


@pytest.mark.parametrize("name", ALL)
def test_one_gradient_stepped_again_and_again_stays_finite(name):
    """One backward, then step() 80 times with the same gradient: a loss with no finite minimum along it, the
    worst case for a step size that adapts (Prodigy's D grows geometrically; prodigyopt overflows inside its step
    at step 56 of the 12-block model in tests/test_prodigy.py). Every optimizer keeps its parameters and state
    finite and raises nothing (a warning is fine)."""
    model = blocks()
    opt = build(name, model)
    model(torch.randn(8, 16)).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(80):
            opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # the same gradient throughout
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in float_state(opt).values())
    assert opt.counters["skipped_steps"] == 0
    if name == "Prodigy":
        assert math.isfinite(opt.d) and opt.param_groups[0]["d_capped"] > 0  # held at its limit, counted


# The optimizers of the registry with sample_fisher, and what makes them sample: K-FAC's true Fisher (the registry
# builds the empirical one, whose sample_fisher is never due).
SAMPLING = {"KFAC": dict(fisher="sampled"), "EKFAC": dict(fisher="sampled")}
FISHER = [n for n in ALL if hasattr(build(n, nn.Sequential(nn.Linear(2, 2))), "sample_fisher")]


def fisher_step(model, opt, x, y):
    """One training step of the Fisher family's loop; whether sample_fisher sampled."""
    logits = model(x)
    sampled = opt.sample_fisher(logits)
    opt.zero_grad()
    F.cross_entropy(logits, y).backward()
    opt.step()
    return sampled


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("name", FISHER)
def test_a_nonfinite_forward_is_skipped_by_sample_fisher(name, policy):
    """A diverged forward on a step that samples: sample_fisher draws no labels (torch's multinomial would raise
    on them), warns and counts (or raises under nonfinite="raise"); the step it belongs to is skipped for its
    non-finite gradient, so parameters and state are those before the forward; the next finite step samples."""
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    opt = build(name, model, nonfinite=policy, **SAMPLING.get(name, {}))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    sampled = [fisher_step(model, opt, x, y)]
    while not (any(sampled) and opt.fisher_due()):  # curvature in the state, and on to a step that samples
        sampled.append(fisher_step(model, opt, x, y))  # (Sophia samples every k steps from step k)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    bad = x.clone()
    bad[0, 0] = math.nan
    logits = model(bad)
    assert not torch.isfinite(logits).all()
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=f"{type(opt).__name__}.sample_fisher: the logits are not finite"):
            opt.sample_fisher(logits)
        assert opt.fisher_skipped == 0
    else:
        with pytest.warns(RuntimeWarning, match="logits are not finite"):
            assert opt.sample_fisher(logits) is False
        assert opt.fisher_skipped == 1
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            opt.step()
        assert opt.counters["skipped_steps"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert same(opt.state_dict()["state"], state)
    if policy == "skip":
        assert fisher_step(model, opt, x, y)  # still due: the skipped step did not advance the clock
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(torch.isfinite(v).all() for v in float_state(opt).values())
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


MOMENT_OPTIMIZERS = {"SOAP": lambda ps: whiten.SOAP(ps, lr=3e-3), "Muon": lambda ps: whiten.Muon(ps, lr=0.02),
                     "ScheduleFreeAdamW": lambda ps: whiten.ScheduleFreeAdamW(ps, lr=1e-3),
                     "Prodigy": lambda ps: whiten.Prodigy(ps, lr=1.0)}


@pytest.mark.parametrize("name", list(MOMENT_OPTIMIZERS))
def test_second_moments_are_checked_in_the_gradients_pass(name, monkeypatch):
    """The overflow check of the Adam-style second moments shares the gradients' reduction and host sync (one
    finite_flags call per step), and an overflowed entry still restarts (its first moment with it)."""
    import whiten.optim._base as base

    torch.manual_seed(0)
    vector = nn.Parameter(torch.randn(16))
    opt = MOMENT_OPTIMIZERS[name]([vector])
    vector.grad = torch.randn(16)
    opt.step()  # the state exists from here on
    calls = []
    real = base.finite_flags
    monkeypatch.setattr(base, "finite_flags", lambda ts: calls.append(len(ts)) or real(ts))
    vector.grad = torch.randn(16)
    opt.step()
    assert calls == [2]  # the gradient and the second moment, together
    opt.state[vector]["exp_avg_sq"][3] = math.inf
    calls.clear()
    kept = set(vars(opt))
    with pytest.warns(RuntimeWarning, match="overflowed"):
        vector.grad = torch.randn(16)
        opt.step()
    assert calls == [2] and opt.counters["factor_restarts"] == 1
    assert torch.isfinite(opt.state[vector]["exp_avg_sq"]).all() and torch.isfinite(vector).all()
    assert set(vars(opt)) - kept <= {"_warned_moment_restart"}  # nothing else kept past the step


EMPTY_AND_TINY = [(0, 5), (5, 0), (0,), (3, 0, 2), (1,), (1, 1), ()]


@pytest.mark.parametrize("name", ALL)
def test_empty_and_one_element_parameters_step(name):
    torch.manual_seed(0)
    normal = nn.Parameter(torch.randn(4, 3))
    odd = [nn.Parameter(torch.randn(s)) for s in EMPTY_AND_TINY]
    opt = OPTIMIZERS[name]([{"params": [normal]}, {"params": odd}])
    before = normal.detach().clone()
    for _ in range(4):
        for q in [normal, *odd]:
            q.grad = torch.randn(q.shape)
        opt.step()
    assert not torch.equal(normal, before)
    assert all(torch.isfinite(q).all() for q in [normal, *odd])
    assert [tuple(q.shape) for q in odd] == EMPTY_AND_TINY


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [dict(lr=math.inf), dict(weight_decay=math.inf), dict(lr=1e38),
                                 dict(lr=math.nan), dict(weight_decay=-1.0)])
def test_out_of_range_hyperparameters_rejected(name, bad):
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=next(iter(bad))):
        OPTIMIZERS[name]([p], **bad)
    opt = OPTIMIZERS[name]([p])
    with pytest.raises(ValueError, match=next(iter(bad))):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], **bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", ALL)
def test_duplicate_parameters_rejected_and_add_param_group_is_atomic(name):
    p, v = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="listed twice"):
        OPTIMIZERS[name]([p, v, p])
    opt = OPTIMIZERS[name]([nn.Parameter(torch.randn(2, 2))])
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": [p, v, p]})
    # one bad tensor among a matrix and a vector (Muon splits such a group in two): nothing is added
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [p, v, torch.zeros(3, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1


def trained(name, dtype=torch.float32, steps=3):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4, dtype=dtype)), nn.Parameter(torch.randn(4, dtype=dtype))]
    opt = OPTIMIZERS[name]([{"params": [params[0]]}, {"params": [params[1]]}])
    for _ in range(steps):
        for q in params:
            q.grad = torch.randn(q.shape, dtype=dtype)
        opt.step()
    return params, opt


def same(a, b) -> bool:
    """Bitwise equality of nested state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def corruptions(name, sd):
    """(label, corrupted copy of sd) for every fault of the campaign that applies to this optimizer."""
    out = []
    # "live" (the live weights of an optimizer with an eval mode) is only a slot in train mode: not required
    for key in [k for k, v in sd["state"][0].items() if isinstance(v, torch.Tensor) and k != "live"]:
        bad = copy.deepcopy(sd)
        del bad["state"][0][key]
        out.append((f"missing {key}", bad))
    bad = copy.deepcopy(sd)
    bad["param_groups"][1]["lr"] = math.inf
    out.append(("lr inf", bad))
    bad = copy.deepcopy(sd)
    tensor_key = next(k for k, v in bad["state"][1].items() if isinstance(v, torch.Tensor))
    bad["state"][1][tensor_key] = torch.full_like(bad["state"][1][tensor_key], math.nan)
    out.append(("nan state", bad))
    bad = copy.deepcopy(sd)
    bad["param_groups"] = bad["param_groups"][:1]
    out.append(("group count", bad))
    if "psgd_kron" in sd["param_groups"][0]:
        bad = copy.deepcopy(sd)
        del bad["param_groups"][0]["psgd_kron"]["coin"]
        out.append(("no coin", bad))
    return out


@pytest.mark.parametrize("name", ALL)
def test_rejected_checkpoints_leave_the_optimizer_bit_identical(name):
    _, source = trained(name, steps=4)
    sd = source.state_dict()
    params, opt = trained(name, steps=2)
    before = copy.deepcopy(opt.state_dict())
    values = [q.detach().clone() for q in params]
    for label, bad in corruptions(name, sd):
        with pytest.raises(ValueError):
            opt.load_state_dict(bad)
        assert same(opt.state_dict(), before), label
        assert all(torch.equal(q, v) for q, v in zip(params, values)), label
    opt.load_state_dict(sd)  # the intact checkpoint still loads
    # (a train-mode "live" slot is a copy of the parameter, which loading a state dict does not change)
    assert same(without_live(opt.state_dict()["state"]), without_live(sd["state"]))


def without_live(state: dict) -> dict:
    return {i: {k: v for k, v in entry.items() if k != "live"} for i, entry in state.items()}


@pytest.mark.parametrize("name", ALL)
def test_float32_checkpoint_into_a_float64_model(name):
    _, source = trained(name, torch.float32)
    params, opt = trained(name, torch.float64, steps=0)
    opt.load_state_dict(source.state_dict())
    for s in opt.state.values():
        for key, v in s.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float64, key
    for _ in range(3):
        for q in params:
            q.grad = torch.randn(q.shape, dtype=torch.float64)
        opt.step()
    assert all(q.dtype == torch.float64 and torch.isfinite(q).all() for q in params)


def test_disproportionate_state_is_warned_about_once():
    v = nn.Parameter(torch.randn(20000))  # Shampoo: 20 blocks of 1024 x 1024 factors and roots for 78 KiB
    opt = OPTIMIZERS["Shampoo"]([v], precondition_frequency=100, max_factor_ratio=None)  # DS's blocking
    v.grad = torch.randn(20000)
    with pytest.warns(RuntimeWarning, match=r"exceeds 16x their memory \(largest: shape \(20000,\)"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once
    small = nn.Parameter(torch.randn(64, 32))
    opt = OPTIMIZERS["SPlus"]([small])
    small.grad = torch.randn(64, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # factors a few times a small matrix: no warning


@pytest.mark.parametrize("name", ALL)
def test_an_lr_written_after_construction_is_checked_at_the_step(name):
    """A scheduler or a loop writing param_groups bypasses the constructor: the step refuses inf/NaN/negative lrs
    before anything changes."""
    p = nn.Parameter(torch.randn(6, 4))
    opt = OPTIMIZERS[name]([p])
    p.grad = torch.randn(6, 4)
    opt.step()
    before = p.detach().clone()
    for bad in (math.inf, math.nan, -1.0):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises(ValueError, match="lr"):
            opt.step()
        assert torch.equal(p, before)
