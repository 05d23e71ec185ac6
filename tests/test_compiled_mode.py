"""``compiled=True`` (whiten.optim.kernels): the elementwise chains run as inductor kernels. For every optimizer of
the registry, on the suite's tiny model in float64 over steps that include each one's refresh, with the lr changed
at every step as a scheduler does: the eager numbers within float rounding (inductor rounds a fused chain in
another order), the same counts, no graph compiled once every kind of step has run, and a step
with a non-finite gradient that leaves everything as it was."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

import whiten
from test_suite import ALL, build, fit_step, make_model

STEPS = 12  # twice past the registry's refresh periods (2 to 5 steps)
WARM = 6  # by then every kind of step has run once (ordinary, refresh, host- and device-checked): no new graph after
# float64: a chain's roundings reordered are ~1e-16 relative a step; whitening amplifies them by the condition of
# its preconditioner over the steps, which stays far below this (norm-wise, see _close)
RTOL, ATOL = 1e-9, 1e-12


def _snapshot(model, opt):
    count = dict(opt.counters)  # first: a sync-free step's skip is resolved (its step counts put back) on reading
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() if isinstance(v, torch.Tensor) else v
             for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    return params, state, count


def _run(name, steps=STEPS, nan_at=(), **kw):
    model = make_model(torch.float64)
    opt = build(name, model, **kw)
    graphs = []
    for t in range(steps):
        if t in nan_at:  # a non-finite gradient: the step must change nothing
            before = _snapshot(model, opt)
            opt.zero_grad()
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            next(model.parameters()).grad[0, 0] = math.nan
            opt.step()
            after = _snapshot(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
            assert all(torch.equal(v, after[1][k]) if isinstance(v, torch.Tensor) else v == after[1][k]
                       for k, v in before[1].items())
        else:
            fit_step(opt, model, t)
        for group in opt.param_groups:  # a scheduler's new lr at every step: a tensor input, never a guard
            group["lr"] *= 0.97
        graphs.append(counters["stats"]["unique_graphs"])
    return _snapshot(model, opt), graphs


def _close(a, b, what):
    """Within ``RTOL`` of the tensor's norm (an eigendecomposition's, an inverse root's accuracy is norm-wise: a
    small entry of a root carries the error of its largest)."""
    err = (a - b).norm().item()
    assert err <= RTOL * b.norm().item() + ATOL, (what, err, b.norm().item())


def _compare(eager, compiled):
    (params, state, count), (c_params, c_state, c_count) = eager, compiled
    for i, (a, b) in enumerate(zip(params, c_params)):
        _close(a, b, f"parameter {i}")
    assert state.keys() == c_state.keys()
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == c_state[k].dtype, k
            if v.is_floating_point():
                _close(v, c_state[k], k)
            else:
                assert torch.equal(v, c_state[k]), k
        else:
            assert v == c_state[k], k
    assert count == c_count


@pytest.mark.parametrize("name", ALL)
def test_compiled_mode_gives_the_eager_numbers_without_recompiling(name):
    eager, _ = _run(name)
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs = _run(name, compiled=True)
    _compare(eager, compiled)
    assert graphs[-1] == graphs[WARM - 1], f"graphs compiled after step {WARM}: {graphs}"


@pytest.mark.parametrize("name", [n for n in ALL if getattr(whiten, n).SYNC_FREE])
def test_compiled_sync_free_step_skips_exactly(name):
    nan_at = (2, 4)
    eager, _ = _run(name, nan_at=nan_at, sync_free=True)
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs = _run(name, nan_at=nan_at, sync_free=True, compiled=True)
    _compare(eager, compiled)
    assert graphs[-1] == graphs[WARM - 1], f"graphs compiled after step {WARM}: {graphs}"


# the state options and other paths through the kernels (Shampoo's grafting choices, Prodigy's coupled decay, ...)
OPTION_CASES = [("SPlus", {"state_dtype": "bf16"}), ("SOAP", {"state_dtype": "bf16"}), ("SPlus", {"basis_bits": 8}),
                ("SOAP", {"basis_bits": 4}), ("Muon", {"state_dtype": "bf16"}), ("Conda", {"state_dtype": "bf16"}),
                ("TNT", {"state_dtype": "bf16"}), ("Shampoo", {"state_dtype": "bf16"}),
                ("PSGDKron", {"state_dtype": "bf16"}), ("KFAC", {"state_dtype": "bf16"}),
                ("SPlus", {"rotation_dtype": "bf16"}), ("Shampoo", {"grafting": None}),
                ("Shampoo", {"grafting": "adagrad"}), ("Prodigy", {"weight_decay": 0.1, "decouple": False}),
                ("Sophia", {"ema_rate": 0.9})]


@pytest.mark.parametrize("name,options", OPTION_CASES, ids=[f"{n}-{o}" for n, o in OPTION_CASES])
def test_compiled_mode_with_state_options(name, options):
    """float64 parameters, 8 steps. With state stored in bf16 a rounding difference of the float64 arithmetic can
    move a stored value across a bf16 rounding boundary (2^-8 of it): measured 1.3e-9 for SOAP, so 1e-7 here.
    (In float32 the suite's tiny model is chaotic: SOAP with bf16 state ends 0.2 apart compiled, and eager ends 0.4
    apart from eager with one parameter entry moved by one ulp. Its eigenbases are near-degenerate.)"""
    runs = []
    for compiled in (False, True):
        model = make_model(torch.float64)
        opt = build(name, model, compiled=compiled, **options)
        for t in range(8):
            fit_step(opt, model, t)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert (a - b).norm() <= 1e-7 * b.norm(), (name, options, ((a - b).norm() / b.norm()).item())


@pytest.mark.parametrize("name", ALL)
def test_compiled_mode_with_bfloat16_parameters(name):
    """bf16 parameters with float32 state: each kernel computes in float32 and rounds once into the parameter, as
    the eager step does; within bf16's rounding of the eager numbers (measured: equal, 6 steps, 2026-12-07)."""
    runs = []
    for compiled in (False, True):
        model = make_model(torch.bfloat16)
        opt = build(name, model, compiled=compiled)
        for t in range(6):
            fit_step(opt, model, t)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
        assert (a.float() - b.float()).norm() <= 2**-8 * a.float().norm()


def test_compiled_must_be_a_bool():
    model = make_model()
    with pytest.raises(ValueError, match="Invalid compiled: 'yes' \\(allowed: True or False\\)"):
        build("SPlus", model, compiled="yes")


def test_a_kernel_that_cannot_compile_runs_eagerly_and_says_so():
    """No working C++ compiler (or Triton): inductor fails before the kernel runs, so nothing is half written; the
    same function runs eagerly from then on, with one warning."""
    import torch._inductor.config as inductor_config
    from whiten.optim.kernels import Kernel

    def scale_(xs, values):
        torch._foreach_mul_(xs, values[0])

    k = Kernel(scale_)
    xs = [torch.ones(3), torch.ones(2)]
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler"), "fx_graph_cache": False}):
        with pytest.warns(RuntimeWarning, match="could not be compiled .* it runs eagerly"):
            k(xs, torch.tensor([2.0], dtype=torch.float64))
        k(xs, torch.tensor([3.0], dtype=torch.float64))  # eagerly again, without another attempt
    assert k._failed
    assert all(torch.equal(x, torch.full_like(x, 6.0)) for x in xs)


def test_a_kernel_past_its_graph_limit_runs_eagerly_and_says_so(monkeypatch):
    """More distinct lists of shapes than the limit (many groups): the graphs compiled so far keep running, a new one
    runs eagerly, with one warning, instead of failing in the middle of a step."""
    from whiten.optim import kernels

    monkeypatch.setattr(kernels, "RECOMPILE_LIMIT", 2)

    def scale_(xs, values):
        torch._foreach_mul_(xs, values[0])

    k = kernels.Kernel(scale_)
    two = torch.tensor([2.0], dtype=torch.float64)
    torch._dynamo.reset()
    lists = [[torch.ones(n)] for n in (1, 2, 3, 4)]
    with pytest.warns(RuntimeWarning, match="reached its 2 graphs"):
        for xs in lists:
            k(xs, two)
    assert all(torch.equal(xs[0], torch.full_like(xs[0], 2.0)) for xs in lists)
    assert not k._failed
