"""``torch.compile(opt.step)``, as PyTorch's tutorial compiles an optimizer, gives the eager numbers for every
optimizer of the registry, warns once that the step ran eagerly, and compiles nothing, so nothing recompiles
(see whiten.optim.compiled for why the step is not traced)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from test_suite import ALL, build, fit_step, make_model

STEPS = 7  # past the registry's refresh periods (2 to 5 steps)


def _run(name, compiled: bool):
    model = make_model(torch.float64)
    opt = build(name, model)
    if compiled:
        opt.step = torch.compile(opt.step)
    for t in range(STEPS):
        fit_step(opt, model, t)
    state = {(i, k): v.clone() if isinstance(v, torch.Tensor) else v
             for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    return [p.detach().clone() for p in model.parameters()], state, dict(opt.counters)


@pytest.mark.parametrize("name", ALL)
def test_compiled_step_gives_the_eager_numbers(name):
    params, state, count = _run(name, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c_params, c_state, c_count = _run(name, compiled=True)
    assert all(torch.equal(a, b) for a, b in zip(params, c_params))
    assert state.keys() == c_state.keys()
    for k, v in state.items():
        assert torch.equal(v, c_state[k]) if isinstance(v, torch.Tensor) else v == c_state[k], k
    assert count == c_count
    said = [w for w in caught if "runs eagerly inside the compiled function" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert counters["stats"]["unique_graphs"] == 0  # nothing traced: no graph, no recompilation



def test_compiling_the_step_of_a_compiled_mode_optimizer_keeps_its_kernels():
    """``torch.compile(opt.step)`` with ``compiled=True``: the step still runs eagerly around whiten's own compiled
    kernels, with the numbers of compiled=True alone."""
    def run(compile_step):
        model = make_model(torch.float64)
        opt = build("ScheduleFreeAdamW", model, compiled=True)
        if compile_step:
            opt.step = torch.compile(opt.step)
        for t in range(4):
            fit_step(opt, model, t)
        return [p.detach().clone() for p in model.parameters()]

    alone = run(False)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = run(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, both))
    assert counters["stats"]["unique_graphs"] > 0  # whiten's kernels, compiled inside the eager step
