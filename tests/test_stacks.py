"""Stable stacks: a bucket's stack holds every same-layout matrix of the group with state, with or without a
gradient this step, so a missing gradient neither rebuilds the stacks nor keeps an old stack alive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_suite import OPTIMIZERS

STABLE = {"SPlus": "momentum", "SOAP": "exp_avg", "PSGDKron": "momentum", "Shampoo": "factor_0_0"}


def run(name, batched, steps=30, dtype=torch.float64):
    torch.manual_seed(0)
    Ws = [nn.Parameter(torch.randn(6, 4, dtype=dtype)) for _ in range(3)]
    opt = OPTIMIZERS[name]([{"params": Ws, "role": "hidden"}], batched=batched)
    g = torch.Generator().manual_seed(1)
    builds = None
    for t in range(steps):
        for k, W in enumerate(Ws):
            grad = torch.randn(6, 4, generator=g, dtype=dtype)
            W.grad = None if (k == 1 and t % 3 == 1) or (k == 2 and t in (5, 6, 7)) else grad
        opt.step()
        if t == 3:
            builds = opt.stack_builds
    return Ws, opt, builds


@pytest.mark.parametrize("name", list(STABLE))
def test_a_missing_gradient_rebuilds_nothing(name):
    Ws, opt, builds = run(name, batched=True)
    assert builds >= 1
    assert opt.stack_builds == builds  # the 26 steps after the first ones, missing gradients included
    slot = STABLE[name]
    storages = {opt.state[W][slot].untyped_storage().data_ptr() for W in Ws}
    assert len(storages) == 1  # every member is a view of the one current stack: no old stack is kept alive


@pytest.mark.parametrize("name", list(STABLE))
def test_stable_stacks_equal_matrix_by_matrix(name):
    batched, _, _ = run(name, batched=True)
    alone, _, _ = run(name, batched=False)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
