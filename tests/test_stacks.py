"""Stable stacks: a bucket's stack holds every same-layout matrix of the group with state, with or without a
gradient this step, so a missing gradient neither rebuilds the stacks nor keeps an old stack alive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_suite import BATCHED, OPTIMIZERS

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
    batched, opt_b, _ = run(name, batched=True)
    alone, opt_a, _ = run(name, batched=False)
    if name == "Shampoo":
        # The (6, 4) weights are 24-element vector blocks whose factors stay rank-deficient for 24 steps: their
        # eps-regularized roots turn a factor one ulp off (1.8e-15) into a root 3.7e-6 off and weights 1.9e-10 off
        # (measured when a stack of one updated its factor by rank-1 gemm). Both paths update these factors
        # element-wise: the same bits, which the tolerance below needs.
        for W, V in zip(batched, alone):
            assert torch.equal(opt_b.state[W]["factor_0_0"], opt_a.state[V]["factor_0_0"])
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# Shapes the rule calls stack-invariant: Shampoo's (8, 8) and (12, 12) are stacked as 64- and 144-element vector blocks
# with a factor, (32, 16) is a 512-element vector without one, (48, 32) a matrix block; PSGD-Kron's sides of 20 and
# more took a matrix-vector product in its norm bound.
INVARIANT_SHAPES = [(8, 8), (12, 12), (32, 16), (48, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", BATCHED)
def test_a_stack_invariant_parameter_has_the_same_bits_alone(name, dtype):
    """What a distributed run relies on (WhitenOptimizer.stack_invariant, docs/distributed.md): a parameter the rule
    calls stack-invariant is a unit of its own, stepped among whichever same-shape parameters its owner holds, so
    its bits must not depend on its stack. Three same-shape parameters in one group (one stack; in one step only the
    first has a gradient, a stack of one) equal, bit for bit, the same three in three groups (stacks of one each).
    On an AVX-512 Xeon with MKL 2024.2 this failed for Shampoo's vector blocks (rank-1 factor updates and R x by
    baddbmm/bmm: 4e-10 apart in float64, 2e-2 in float32) and PSGD-Kron (a x in its norm bound, 1 ulp): torch calls
    gemm for a stack of one and batched gemm for larger ones, and MKL rounds products with a dimension of 1
    differently in the two.

    At one thread, as each process of the distributed tests runs: with two, MKL splits a batched product's work
    differently from a single one's, and Shampoo's (12, 12) came out 1.2e-13 apart in float64 on the same Xeon (the
    rule cannot see threads; docs/distributed.md says so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _same_bits_alone(name, dtype)
    finally:
        torch.set_num_threads(threads)


def _same_bits_alone(name, dtype):
    for shape in INVARIANT_SHAPES:
        results = []
        for split in (False, True):
            torch.manual_seed(0)
            Ws = [nn.Parameter(torch.randn(shape, dtype=dtype)) for _ in range(3)]
            groups = [{"params": [W], "role": "hidden"} for W in Ws] if split else [{"params": Ws, "role": "hidden"}]
            opt = OPTIMIZERS[name](groups, batched=True)
            assert all(opt.stack_invariant(W, g) for g in opt.param_groups for W in g["params"]), shape
            g = torch.Generator().manual_seed(1)
            for t in range(8):
                for k, W in enumerate(Ws):
                    grad = torch.randn(shape, generator=g, dtype=dtype)
                    W.grad = None if (t == 2 and k == 1) or (t == 4 and k > 0) else grad
                opt.step()
            state = [v for W in Ws for _, v in sorted(opt.state[W].items()) if torch.is_tensor(v)]
            results.append([W.detach().clone() for W in Ws] + [v.clone() for v in state])
        together, alone = results
        assert len(together) == len(alone)
        assert all(torch.equal(a, b) for a, b in zip(together, alone)), (
            shape, max((a - b).abs().max().item() for a, b in zip(together, alone)))
