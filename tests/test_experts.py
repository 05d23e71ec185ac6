"""Mixture-of-experts weights (E, out, in) in a group of role ``experts`` are stepped as E independent matrices:
the numbers (parameters and state, bit for bit, in float64) are those of E separate (out, in) parameters of role
``hidden``, for every optimizer of the shared registry; checkpoints, eval()/train() and ``param_groups`` detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whiten
from test_distributed import ALL
from test_suite import OPTIMIZERS

SHAPES = [(3, 8, 6), (4, 6, 8)]  # two expert tensors: E = 3 of (8, 6), E = 4 of (6, 8)
STEPS = 7


def _grads(t: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _tensors():
    torch.manual_seed(0)
    return [torch.randn(s, dtype=torch.float64) * 0.3 for s in SHAPES]


def _runs(name, steps=STEPS, **kw):
    """(experts, separate): the same weights as 3-D parameters of role experts and as 2-D parameters of role
    hidden, stepped with the same gradients."""
    stacked = [nn.Parameter(t.clone()) for t in _tensors()]
    apart = [nn.Parameter(t[e].clone()) for t in _tensors() for e in range(t.shape[0])]
    a = OPTIMIZERS[name]([{"params": stacked, "role": "experts"}], **kw)
    b = OPTIMIZERS[name]([{"params": apart, "role": "hidden"}], **kw)
    for t in range(steps):
        grads = _grads(t)
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        for p, g in zip(apart, [g[e] for g in grads for e in range(g.shape[0])]):
            p.grad = g.clone()
        a.step()
        b.step()
    return (a, stacked), (b, apart)


def _differences(a, stacked, b, apart) -> list[str]:
    out = []
    j = 0
    for p in stacked:
        for e in range(p.shape[0]):
            q = apart[j]
            j += 1
            if not torch.equal(p[e], q):
                out.append(f"value of expert {e} of {tuple(p.shape)}")
            mine, theirs = a.state[p], b.state[q]
            if set(mine) != set(theirs):
                out.append(f"state keys {sorted(mine)} vs {sorted(theirs)}")
                continue
            for k, v in theirs.items():
                w = mine[k][e] if isinstance(mine[k], (torch.Tensor, list)) else mine[k]  # a shared count
                same = torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v
                if not same:
                    out.append(f"state {k!r} of expert {e} of {tuple(p.shape)}")
    return out


@pytest.mark.parametrize("name", [n for n in ALL if n != "MFAC"])
def test_experts_step_as_separate_matrices_bit_for_bit(name):
    (a, stacked), (b, apart) = _runs(name)
    assert _differences(a, stacked, b, apart) == []
    # the parameters moved: the comparison is not between two untouched copies
    assert not torch.equal(stacked[0], _tensors()[0])


def test_mfac_steps_experts_as_its_one_vector():
    """M-FAC preconditions all parameters as one vector: an experts parameter is its part of that vector, as
    under any other role (the state stays its own, not stacked per expert)."""
    p = nn.Parameter(_tensors()[0])
    q = nn.Parameter(_tensors()[0])
    a = OPTIMIZERS["MFAC"]([{"params": [p], "role": "experts"}])
    b = OPTIMIZERS["MFAC"]([{"params": [q], "role": "conv"}])
    for t in range(3):
        p.grad, q.grad = _grads(t)[0], _grads(t)[0].clone()
        a.step()
        b.step()
    assert torch.equal(p, q)
    assert a.state[p]["grads"].shape == b.state[q]["grads"].shape


def test_experts_are_not_one_matrix():
    """The role changes the numbers: (E, out, in) stepped as one (E·out, in) or (E, out·in) matrix differs."""
    (a, stacked), _ = _runs("SOAP", steps=3)
    p = nn.Parameter(_tensors()[0])
    opt = OPTIMIZERS["SOAP"]([{"params": [p], "role": "conv"}])
    for t in range(3):
        p.grad = _grads(t)[0]
        opt.step()
    assert not torch.equal(p, stacked[0])


@pytest.mark.parametrize("name", ["SPlus", "SOAP", "Shampoo", "Muon", "PSGDKron"])
def test_experts_state_dict_resumes_exactly(name):
    (a, stacked), _ = _runs(name, steps=4)
    sd = a.state_dict()
    for k, v in sd["state"][0].items():  # one entry per parameter, the experts' state stacked
        if isinstance(v, torch.Tensor):
            assert v.shape[0] == SHAPES[0][0], k
    copy = [nn.Parameter(p.detach().clone()) for p in stacked]
    b = OPTIMIZERS[name]([{"params": copy, "role": "experts"}])
    b.load_state_dict(sd)
    for t in range(4, 7):
        for p, q, g in zip(stacked, copy, _grads(t)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(stacked, copy))


def test_eval_swaps_the_experts_average():
    (a, stacked), (b, apart) = _runs("SPlus", steps=4)
    a.eval()
    b.eval()
    assert _differences(a, stacked, b, apart) == []
    a.train()
    b.train()
    assert _differences(a, stacked, b, apart) == []


def test_param_groups_finds_experts_by_name():
    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts_w1 = nn.Parameter(torch.zeros(4, 8, 6))
            self.gate = nn.Linear(6, 4)
            self.kernel = nn.Parameter(torch.zeros(2, 3, 3))

    groups = whiten.param_groups(MoE())
    roles = {g["role"]: [tuple(p.shape) for p in g["params"]] for g in groups}
    assert roles["experts"] == [(4, 8, 6)]
    assert roles["conv"] == [(2, 3, 3)]  # a 3-D tensor not named like experts keeps its role


def test_a_role_experts_tensor_needs_three_dims():
    with pytest.raises(ValueError, match="role 'experts'.*3 or more dims"):
        whiten.SOAP([{"params": [nn.Parameter(torch.zeros(4, 4))], "role": "experts"}])


def test_planned_work_counts_each_expert():
    p = nn.Parameter(torch.zeros(4, 8, 6))
    opt = whiten.SOAP([{"params": [p], "role": "experts"}])
    one = opt.work_cost(torch.zeros(8, 6), opt.param_groups[0])
    assert opt.work_cost(p, opt.param_groups[0]) == 4 * one
    report = opt.memory_report()  # planned before the first step: the stacks of the experts' state
    assert "experts" in str(report)


@pytest.mark.parametrize("name,options", [("SPlus", {"state_dtype": "bf16"}), ("SPlus", {"basis_bits": 4}),
                                          ("SOAP", {"basis_bits": 8}), ("TNT", {"state_dtype": "bf16"}),
                                          ("Muon", {"state_dtype": "bf16"}), ("Conda", {"state_dtype": "bf16"}),
                                          ("SOAP", {"max_factor_ratio": 20}), ("Shampoo", {"state_dtype": "bf16"}),
                                          ("PSGDKron", {"state_dtype": "bf16"}), ("KFAC", {"state_dtype": "bf16"}),
                                          ("EKFAC", {"state_dtype": "bf16"})])
def test_experts_with_reduced_state_step_as_separate_matrices(name, options):
    """The state options of issue 23 (bf16 storage, quantized bases, sides left out) hold per expert too."""
    (a, stacked), (b, apart) = _runs(name, **options)
    assert _differences(a, stacked, b, apart) == []
    assert a.memory_report() is not None
